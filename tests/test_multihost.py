"""Two JAX processes (2 CPU devices each, gloo collectives, a localhost coordinator) train
exactly as one process with 4 devices, and their checkpoint resumes in one process (issue 6).

Every run is the package's own `train_stage` on a tiny synthetic face task
(tests/multihost_worker.py): each process reads its own shard of the data
(`ShardByJaxProcess`), the global batch is assembled with
`jax.make_array_from_process_local_data`, orbax writes from both processes, and only
process 0 writes metrics, model.json and DONE. The 1-process reference reads the two
shards itself and concatenates them, so it sees the same global batches.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # multihost_worker
WORKER = os.path.join(HERE, "multihost_worker.py")
ROOT = os.path.dirname(HERE)
TIMEOUT = 1800  # seconds per phase: about a minute on an idle 2-core machine, far more when shared


def _env():
  return cli_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_all(cmds, logs, timeout):
  """Start every command, wait for all; on a failure or the deadline kill the rest."""
  procs = [subprocess.Popen([sys.executable, WORKER, *c], cwd=ROOT, env=_env(),
                            stdout=open(l, "w"), stderr=subprocess.STDOUT) for c, l in zip(cmds, logs)]
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  bad = [(c, p.returncode, l) for c, p, l in zip(cmds, procs, logs) if p.returncode != 0]
  if bad:
    msg = "\n".join(f"{c} -> {rc}:\n{open(l).read()[-3000:]}" for c, rc, l in bad)
    raise AssertionError(f"worker(s) failed or timed out after {timeout}s:\n{msg}")
  return [open(l).read() for l in logs]


def _export_teacher(path):
  """A random tiny teacher (this process's JAX; the workers only read it)."""
  import jax
  import multihost_worker as w
  from askd_jax.train import checkpoint as ckpt_lib
  task = w.make_task(w.tiny_config())
  ckpt_lib.export_model(path, jax.device_get(w.init_teacher(task)), task.spec())


def _metrics(path):
  with open(path) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["value"] for r in rows if r["tag"] == "student/loss"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  teacher = str(tmp / "teacher")
  ref, mh = str(tmp / "ref"), str(tmp / "mh")
  out = {"ref": ref, "mh": mh}
  _export_teacher(teacher)
  # 1 process with 4 devices, reading the two process shards itself.
  _run_all([["train", "--devices", "4", "--teacher", teacher, "--workdir", ref,
             "--virtual-shards", "2", "--dump", str(tmp / "ref.npz")]], [str(tmp / "ref.log")],
           TIMEOUT)
  # 2 processes x 2 devices, the margin weight and its momentum split over the 4 devices.
  port = _free_port()
  _run_all([["train", "--devices", "2", "--num-processes", "2", "--process-id", str(i),
             "--port", str(port), "--teacher", teacher, "--workdir", mh, "--shard-min", "256",
             "--dump", str(tmp / "mh.npz")] for i in range(2)],
           [str(tmp / f"mh{i}.log") for i in range(2)], TIMEOUT)
  # Its checkpoint (step 3) continues in 1 process with 4 devices to step 5.
  out["mh_done"] = os.path.exists(os.path.join(mh, "student", "DONE"))
  out["mh_spec"] = json.load(open(os.path.join(mh, "student", "model.json")))
  shutil.copy(os.path.join(mh, "tb_process0.jsonl"), str(tmp / "mh_tb0.jsonl"))
  out["mh_results"] = [json.load(open(os.path.join(mh, f"result_process{i}.json")))
                       for i in range(2)]
  # A copy of the 2-process stage (step 3), to load as a model in this process.
  shutil.copytree(os.path.join(mh, "student"), str(tmp / "mh_student"))
  os.remove(os.path.join(mh, "student", "DONE"))
  os.remove(os.path.join(mh, "tb_process0.jsonl"))
  (log,) = _run_all([["train", "--devices", "4", "--teacher", teacher, "--workdir", mh,
                      "--steps", "5", "--check-restore", str(tmp / "mh.npz"),
                      "--dump", str(tmp / "cont.npz")]], [str(tmp / "cont.log")], TIMEOUT)
  out.update(tmp=tmp, cont_log=log,
             cont=json.load(open(os.path.join(mh, "result_process0.json"))),
             cont_spec=json.load(open(os.path.join(mh, "student", "model.json"))))
  return out


def _params(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def test_two_processes_equal_one_process(runs):
  from multihost_worker import rel_diff
  tmp = runs["tmp"]
  ref, mh = _params(tmp / "ref.npz"), _params(tmp / "mh.npz")
  d = rel_diff(mh, ref)
  assert d["finite"] and d["rel"] < 1e-5, d
  l_ref = _metrics(os.path.join(runs["ref"], "tb_process0.jsonl"))
  l_mh = _metrics(tmp / "mh_tb0.jsonl")
  assert sorted(l_ref) == sorted(l_mh) == [1, 2, 3]
  np.testing.assert_allclose([l_mh[s] for s in (1, 2, 3)], [l_ref[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  assert all(r["final_step"] == 3 for r in runs["mh_results"])
  assert [r["process"] for r in runs["mh_results"]] == [0, 1]


def test_only_process_zero_writes(runs):
  assert runs["mh_done"] and runs["mh_spec"]["trained_steps"] == 3
  # process 1 ran all steps but wrote no metrics (it would have made tb_process1.jsonl)
  assert not os.path.exists(os.path.join(runs["mh"], "tb_process1.jsonl"))


def test_checkpoint_from_two_processes_resumes_in_one(runs):
  c = runs["cont"]
  assert c["restored_step"] == 3 and c["restored_max_abs_diff"] == 0.0
  assert c["final_step"] == 5 and c["steps_saved"][-1] == 5
  assert runs["cont_spec"]["resumed_from"] == 3 and runs["cont_spec"]["trained_steps"] == 5
  assert "written by 2 process(es)" in runs["cont_log"]  # the data position was mapped
  tmp = runs["tmp"]
  cont, mh = _params(tmp / "cont.npz"), _params(tmp / "mh.npz")
  assert all(np.isfinite(v).all() for v in cont.values())
  assert max(float(np.abs(cont[k] - mh[k]).max()) for k in mh) > 1e-6  # it trained on
  losses = _metrics(os.path.join(runs["mh"], "tb_process0.jsonl"))
  assert sorted(losses) == [4, 5] and all(np.isfinite(list(losses.values())))


def test_model_written_by_two_processes_loads_in_this_process(runs):
  """Evaluation / a teacher on one host: `load_model` of the stage two processes wrote
  (margin weight sharded over their 4 devices) restores onto this process's devices."""
  from askd_jax.train.checkpoint import load_model
  from multihost_worker import flat
  variables, spec = load_model(str(runs["tmp"] / "mh_student"))
  assert spec["trained_steps"] == 3
  got = {k: v for k, v in flat(variables["params"]).items()}
  want = _params(runs["tmp"] / "mh.npz")
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_stop_signal_on_one_host_stops_every_host_at_the_same_step(runs):
  """SIGTERM reaching process 1 only (during step 2): the processes agree on it
  after step 2, both save step 2 together and stop, none waits forever in a lone save.
  (The layout of the two-process run above, `--shard-min 256`: the same programs, which
  the session's persistent XLA cache holds.)"""
  tmp = runs["tmp"]
  wd = str(tmp / "preempt")
  port = _free_port()
  _run_all([["train", "--devices", "2", "--num-processes", "2", "--process-id", str(i),
             "--port", str(port), "--teacher", str(tmp / "teacher"), "--workdir", wd,
             "--shard-min", "256", "--steps", "5"] + (["--sigterm-at-step", "2"] if i == 1 else [])
            for i in range(2)], [str(tmp / f"preempt{i}.log") for i in range(2)], 600)
  res = [json.load(open(os.path.join(wd, f"result_process{i}.json"))) for i in range(2)]
  assert "another process received a stop signal" in res[0]["preempted"]
  assert res[1]["preempted"].startswith("SIGTERM received")
  assert all("stopped after step 2" in r["preempted"] for r in res)
  assert all(r["steps_saved"] == [2] for r in res)
  assert not os.path.exists(os.path.join(wd, "student", "DONE"))
