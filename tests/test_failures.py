"""Issue 21 cases that need no training: signals recorded by a flag, the workdir lock and
guard, overrides, one-line failures, data validation, loader workers dying with their parent.

Cases that train (signals at every phase of a real run, the CLI's one-line failures on a
trained workdir) are in tests/test_signals.py. docs/reliability.md lists every case.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from askd_jax import stop

from conftest import cli_env

REPO = Path(__file__).resolve().parents[1]


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  return cli_env(env)


def _cli(args, tmp_path, timeout=300):
  p = subprocess.run([sys.executable, "-m", "askd_jax.main", *args], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def _one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert len(lines) <= 3, stderr[-3000:]
  errs = [l for l in lines if l.startswith("error: ")]
  assert len(errs) == 1, stderr[-3000:]
  return errs[0]


# --- 1. signals: the handler records, safe points raise -------------------------------------

class _Noisy:
  """Delivers a signal from inside __del__ (the moment the old handler's exception was lost
  as 'Exception ignored in ...')."""

  def __init__(self, sig):
    self.sig = sig

  def __del__(self):
    os.kill(os.getpid(), self.sig)


def test_signal_inside_del_and_gc_callback_is_honoured_at_the_next_safe_point(capfd):
  """Bug put back by hand (a handler that raises Preempted itself, as before): the signal sent
  inside __del__ / a gc callback printed 'Exception ignored in' and the loop ran to its end."""
  delivered = 0
  for n, sig in enumerate([signal.SIGTERM, signal.SIGINT] * 3):
    with stop.handling():
      def at_gc(phase, info, sig=sig):
        if phase == "start":
          gc.callbacks.remove(at_gc)
          os.kill(os.getpid(), sig)
      if n % 2:
        gc.callbacks.append(at_gc)
        gc.collect()
      else:
        x = _Noisy(sig)
        del x
      delivered += 1
      with pytest.raises(stop.Preempted, match=rf"{signal.Signals(sig).name} received: stopped "
                         r"during evaluate t HR .*run the same command again to resume"):
        for _ in range(1000):
          stop.at("evaluate", "t HR")
    assert stop.requested() is None  # cleared when the outermost block ends
  assert delivered == 6
  assert "Exception ignored" not in capfd.readouterr().err


def test_second_sigint_exits_at_once_with_a_line(tmp_path):
  code = textwrap.dedent("""
      import os, signal, sys, time
      from askd_jax import stop
      stop.install()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      print("first", stop.requested(), flush=True)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
      print("not reached", flush=True)
  """)
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 130, p.stderr
  assert "first SIGINT" in p.stdout and "not reached" not in p.stdout
  assert "SIGINT received: stopping at the next safe point" in p.stderr
  assert "second SIGINT: exiting at once without saving" in p.stderr


# --- 3./5. the workdir lock and the guard -----------------------------------------------------

def test_lock_refuses_a_second_process_and_takes_over_a_dead_ones(tmp_path):
  from askd_jax.workdir import Lock, WorkdirError
  w = tmp_path / "w"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from askd_jax.workdir import Lock; "
       f"l = Lock({str(w)!r}); l.acquire(); print('held', flush=True); time.sleep(120)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirError, match=rf"{w} is in use by process {holder.pid} .*wait for "
                     "that run to finish or stop it"):
    Lock(str(w)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = Lock(str(w))
  line = lock.acquire()  # the kernel released the flock; the dead pid is still in the file
  assert line == (f"took over the lock {w}/.lock left by process {holder.pid}, which is no "
                  "longer running (a killed run); resuming")
  assert (w / ".lock").read_text().strip() == str(os.getpid())
  lock.release()  # a clean exit leaves no owner behind
  assert (w / ".lock").read_text() == ""
  assert Lock(str(w)).acquire() is None


def _demo_cfg():
  from askd_jax import experiment
  return experiment.load_config(str(REPO / "configs" / "facerec.py"))


def _fake_done_stage(w: Path, name: str, cfg_hash: str):
  d = w / name
  d.mkdir(parents=True)
  (d / "model.json").write_text(json.dumps({"config_hash": cfg_hash, "kind": "teacher"}))
  (d / "DONE").write_text("8\n")


def test_done_stage_is_checked_against_its_own_config_when_config_json_is_gone(tmp_path):
  """Case 2: config.json deleted, another width; bug put back (guard reading config.json
  only): the run was accepted and config.json rewritten."""
  from askd_jax import experiment
  from askd_jax.train.loop import cfg_hash
  from askd_jax.workdir import WorkdirError
  a, b = _demo_cfg(), _demo_cfg()
  b.model.width = 0.5
  w = tmp_path / "w"
  _fake_done_stage(w, "teacher", cfg_hash(a))
  with pytest.raises(WorkdirError, match=rf"{w}/teacher was trained with another config \(hash "
                     rf"{cfg_hash(a)}, this run's is {cfg_hash(b)}; recorded in "
                     rf"{w}/teacher/model.json\).*--overwrite"):
    experiment.guard_workdir(str(w), b, overwrite=False)
  assert not (w / "config.json").exists()  # nothing written
  experiment.guard_workdir(str(w), a, overwrite=False)  # the original config goes on
  assert json.loads((w / "config.json").read_text())["config_hash"] == cfg_hash(a)


def test_refused_run_writes_nothing_and_the_original_command_still_runs(tmp_path):
  """Case 3: an unfinished stage whose newest checkpoint says another config is refused by
  the guard before config.json is touched; bug put back (write first, check after): the
  original config was then refused as 'another config'."""
  import jax.numpy as jnp
  from askd_jax import experiment
  from askd_jax.train import state_io
  from askd_jax.train.loop import cfg_hash
  from askd_jax.workdir import WorkdirError
  a, b = _demo_cfg(), _demo_cfg()
  b.model.embedding_dim = 64
  w = tmp_path / "w"
  mgr = state_io.manager(str(w / "teacher" / "checkpoints"))
  state_io.save(mgr, 2, {"w": jnp.arange(4.0)}, b"{}", {"config_hash": cfg_hash(a)})
  (w / "config.json").unlink(missing_ok=True)
  with pytest.raises(WorkdirError, match=r"teacher was trained with another config .*"
                     r"checkpoints/2/meta/metadata"):
    experiment.guard_workdir(str(w), b, overwrite=False)
  assert not (w / "config.json").exists()
  experiment.guard_workdir(str(w), a, overwrite=False)
  experiment.guard_workdir(str(w), b, overwrite=True)  # as the message says: moved aside
  assert not (w / "teacher").exists()
  assert json.loads((w / "config.json").read_text())["config_hash"] == cfg_hash(b)


def test_write_json_leaves_no_tmp_file_when_the_write_fails(tmp_path, monkeypatch):
  """Case 8 (disk full at start left an empty config.json.tmp)."""
  from askd_jax import workdir
  def full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(workdir.json, "dump", full)
  with pytest.raises(OSError):
    workdir.write_json(str(tmp_path / "config.json"), {"a": 1})
  assert list(tmp_path.iterdir()) == []


# --- 4. overrides: one last value per field -----------------------------------------------------

def test_repeated_overrides_keep_the_last_value_lists_included():
  from askd_jax.experiment import last_value_per_field
  argv = ["--config=c.py", "--config.student.sizes=7,", "--workdir=w",
          "--config.student.sizes=8", "--config.student.methods=askd",
          "--config.train.lr", "0.3", "--config.student.methods=", "--config.train.lr=0.2"]
  assert last_value_per_field(argv) == ["--config=c.py", "--workdir=w",
                                        "--config.student.sizes=8", "--config.student.methods=",
                                        "--config.train.lr=0.2"]


def test_cli_repeated_list_override_trains_only_the_last_and_empty_is_empty(tmp_path):
  """Bug put back (no dedupe): sizes were (7, 8) and the empty methods override was dropped."""
  rc, out, err = _cli(["--config.student.sizes=7,", "--config.student.sizes=200",
                       f"--workdir={tmp_path / 'w'}"], tmp_path)
  assert rc == 2
  assert _one_line(err) == ("error: config.student.sizes has 200, but sizes must be integers "
                            "in [1, data.image_size=56]; lower it or raise data.image_size")
  rc, out, err = _cli(["--config.student.methods=askd", "--config.student.methods=",
                       f"--workdir={tmp_path / 'w'}"], tmp_path)
  assert rc == 2 and "config.student.methods is empty" in _one_line(err)
  assert not (tmp_path / "w").exists()


# --- 8./10. one line for bad config files and flags ---------------------------------------------

CONFIG_FILES = [
    ("syntax", "def get_config(:\n", r"--config=\S+syntax.py: line 1: invalid syntax \(not a "
     r"Python config file\?\); fix the file, which must define get_config\(preset\)"),
    ("plain_text", "hello world, not python\n", r"--config=\S+plain_text.py: line 1: invalid "
     r"syntax"),
    ("raises", "def get_config():\n  raise RuntimeError('boom')\n",
     r"--config=\S+raises.py: get_config\(\) raised RuntimeError: boom; fix the config file"),
    ("no_get_config", "x = 1\n", r"--config=\S+no_get_config.py: the file defines no "
     r"get_config\(\); define get_config\(preset\)"),
]


@pytest.mark.parametrize("name,text,expect", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_broken_config_file_is_one_line(tmp_path, name, text, expect):
  f = tmp_path / f"{name}.py"
  f.write_text(text)
  rc, out, err = _cli([f"--config={f}", f"--workdir={tmp_path / 'w'}"], tmp_path)
  assert rc == 2, err[-2000:]
  assert __import__("re").fullmatch("error: " + expect + ".*", _one_line(err)), err
  assert not (tmp_path / "w").exists()


EVAL_FLAGS = [
    ("sizes_not_int", lambda t: ["--evaluate=" + str(t), "--eval_sizes=abc"],
     "error: --eval_sizes=abc: give comma-separated integer sizes in px, e.g. --eval_sizes=7,14"),
    ("sizes_without_evaluate", lambda t: ["--eval_sizes=7", f"--workdir={t / 'w'}"],
     "error: --eval_sizes=7 only applies with --evaluate=MODEL_DIR"),
    ("missing_dir", lambda t: [f"--evaluate={t / 'nope'}"],
     "error: --evaluate={t}/nope does not exist; give a stage directory"),
    ("ckpt_file", lambda t: [f"--evaluate={t / 'net.ckpt'}"],
     "error: --evaluate={t}/net.ckpt is a file, not a model directory; convert a PyTorch "
     "checkpoint first: python -m askd_jax.tools.convert"),
    ("unfinished", lambda t: [f"--evaluate={t / 'teacher'}"],
     "error: --evaluate={t}/teacher is a training stage that has not finished"),
]


@pytest.mark.parametrize("name,args,expect", EVAL_FLAGS, ids=[c[0] for c in EVAL_FLAGS])
def test_evaluate_flags_name_the_flag(tmp_path, name, args, expect):
  (tmp_path / "net.ckpt").write_bytes(b"x")
  (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)
  rc, out, err = _cli(args(tmp_path) + ["--config.tune_cpu=False"], tmp_path)
  assert rc == 2, err[-2000:]
  assert _one_line(err).startswith(expect.format(t=tmp_path)), err


@pytest.mark.parametrize("what", ["workdir", "jax_cache_dir"])
def test_unwritable_places_are_one_line_naming_the_flag(tmp_path, what):
  if os.geteuid() == 0:
    pytest.skip("root writes anywhere: permissions cannot be tested")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  args = ([f"--workdir={ro / 'w'}"] if what == "workdir"
          else [f"--config.jax_cache_dir={ro / 'c'}", f"--workdir={tmp_path / 'w'}"])
  rc, out, err = _cli(args + ["--config.train.steps=1"], tmp_path)
  line = _one_line(err)
  assert rc == (1 if what == "workdir" else 2)
  assert ("--workdir=" if what == "workdir" else "config.jax_cache_dir=") in line
  assert "writable" in line


def test_a_failed_run_writes_its_line_and_trace_to_run_log_only(tmp_path, monkeypatch, capfd):
  """experiment.run, once the workdir is checked: an unexpected failure's one line and full
  trace go to WORKDIR/run.log, not the terminal, and the exception names that file (the CLI
  adds `(full trace in W/run.log)`); a refusal of the package's own is not 'unexpected'."""
  from askd_jax import experiment, failures, tasks
  from askd_jax.workdir import WorkdirError

  def broken_task(cfg):
    raise RuntimeError("boom\nsecond line")
  monkeypatch.setattr(tasks, "get_task", broken_task)
  w = tmp_path / "w"
  with pytest.raises(RuntimeError) as info:
    experiment.run(_demo_cfg(), str(w))
  assert info.value.run_log == str(w / "run.log") and failures.unexpected(info.value)
  log = (w / "run.log").read_text()
  assert "ERROR askd_jax: RuntimeError: boom\nTraceback" in log and "broken_task" in log
  assert "Traceback" not in capfd.readouterr().err
  assert not failures.unexpected(WorkdirError("in use")) and not failures.unexpected(OSError())


def test_os_errors_name_the_flag_and_the_fix():
  from askd_jax.failures import describe_failure
  cfg = _demo_cfg()
  with cfg.unlocked():
    cfg.data.data_dir = "/data/tfds"
  code, line = describe_failure(OSError(28, "No space left on device", "/runs/w/teacher/x"),
                                cfg, "/runs/w")
  assert code == 1 and line == ("--workdir=/runs/w: cannot write /runs/w/teacher/x (No space "
                                "left on device); free disk space (or move the run to a larger "
                                "disk), then run the same command again to resume from the "
                                "newest checkpoint")
  code, line = describe_failure(PermissionError(13, "Permission denied", "/data/tfds/orl"),
                                cfg, "/runs/w")
  assert code == 1 and line.startswith("config.data.data_dir=/data/tfds: cannot write "
                                       "/data/tfds/orl (Permission denied); make it writable")
  # a library's wrapped message (tensorstore: no errno) is still recognised
  code, line = describe_failure(ValueError("WRITE failed for /runs/w/s/1/d/ab: [errno 28] No "
                                           "space left on device"), cfg, "/runs/w")
  assert code == 1 and "No space left on device" in line and "free disk space" in line
  code, line = describe_failure(RuntimeError("weird\nsecond line"), cfg, "/runs/w")
  assert (code, line) == (1, "RuntimeError: weird")
  assert describe_failure(stop.Preempted("SIGTERM received: x"), cfg, "/w") == (
      0, "SIGTERM received: x")


# --- 9. data validation ----------------------------------------------------------------------

@pytest.mark.parametrize("labels,bad_line,bad", [((0, -1, 1), 2, -1), ((0, 1, 1000000), 3,
                                                                          1000000)])
def test_list_labels_outside_0_to_identities_are_refused_naming_the_line(tmp_path, labels,
                                                                          bad_line, bad):
  """Case 9: a negative label passed prepare (then NaN in training); 1,000,000 made 1,000,001
  classes. Bug put back (no check): read_image_list returned the entries."""
  from askd_jax.data.faces import read_image_list
  for i in range(3):
    (tmp_path / f"{i}.jpg").write_bytes(b"x")
  lst = tmp_path / "train.list"
  lst.write_text("".join(f"{i}.jpg {l}\n" for i, l in enumerate(labels)))
  with pytest.raises(ValueError, match=rf"{lst} line {bad_line}: label {bad} is outside "
                     r"\[0, 3\) \(the list names 3 identities\); number the identities 0\.\.2"):
    read_image_list(str(lst), str(tmp_path))


def test_rec_labels_outside_0_to_identities_are_refused(tmp_path):
  import io
  from PIL import Image
  from askd_jax.data import faces, recordio
  buf = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buf, "JPEG")
  for labels, expect in (((0, -3), r"record \d+: label -3 is negative"),
                         ((0, 1, 50), r"record \d+: label 50 is outside \[0, 3\)")):
    d = tmp_path / f"rec{len(labels)}"
    d.mkdir()
    recordio.write_insightface_rec(str(d / "train.rec"), str(d / "train.idx"),
                                   [(buf.getvalue(), l) for l in labels])
    with pytest.raises(ValueError, match=expect):
      faces.prepare("rec", str(d), str(tmp_path / "out"))


def test_edited_iterator_position_is_caught_by_the_checkpoint_hash(tmp_path):
  """Case 9: an edited but valid position resumed with other batches. Bug put back (no
  data_hash): the step restored with the edited position."""
  import jax.numpy as jnp
  from askd_jax.train import state_io
  ck = tmp_path / "ck"
  mgr = state_io.manager(str(ck))
  st = {"w": jnp.arange(8.0)}
  for step, pos in ((1, 8), (2, 16)):
    state_io.save(mgr, step, st, json.dumps({"next_index": pos}).encode(), {})
  f = ck / "2" / "data" / "metadata"
  f.write_text(f.read_text().replace("16", "24"))
  step, _, data, _ = state_io.restore_latest(state_io.manager(str(ck)), st)
  assert step == 1 and json.loads(data) == {"next_index": 8}
  assert [p.name.split(".")[0] for p in ck.iterdir() if "unreadable" in p.name] == ["2"]


def test_converter_refuses_a_non_finite_tensor_naming_it(tmp_path):
  """Case 9: a corrupted weight converted without complaint."""
  torch = pytest.importorskip("torch")
  from askd_jax.tools import convert
  sd = {"conv1.weight": torch.zeros(4, 3, 3, 3), "bn1.running_var": torch.ones(4)}
  sd["bn1.running_var"][2] = float("nan")
  torch.save({"net_state_dict": sd}, tmp_path / "net.ckpt")
  with pytest.raises(convert.ConvertError, match=r"net.ckpt: tensor 'bn1.running_var' holds 1 "
                     r"non-finite value\(s\) \(NaN/Inf\) of 4; the checkpoint is corrupt"):
    convert.load_torch_state(str(tmp_path / "net.ckpt"))


# --- 10. wording --------------------------------------------------------------------------------

def test_teacher_wording_unfinished_file_and_student(tmp_path):
  from askd_jax import config_check
  from askd_jax.config_check import ConfigError
  cfg = _demo_cfg()
  (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
  (tmp_path / "net.ckpt").write_bytes(b"x")
  s = tmp_path / "student"
  s.mkdir()
  (s / "model.json").write_text(json.dumps({"task": "facerec", "kind": "student",
                                            "method": "askd", "sizes": [7], "input_size": 56}))
  for path, expect in (("unfinished", "is a training stage that has not finished (checkpoints/"
                        " but no model.json yet); run its training command again"),
                       ("net.ckpt", "is a file, not a model directory; convert a PyTorch "
                        "checkpoint first (python -m askd_jax.tools.convert"),
                       ("student", "is a student (askd, 7 px), not a teacher")):
    with pytest.raises(ConfigError) as e:
      config_check.check_teacher(cfg, str(tmp_path / path))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_binary_idx_names_the_file(tmp_path):
  from askd_jax.data import recordio
  f = tmp_path / "train.idx"
  f.write_bytes(bytes(range(128, 256)) * 4)
  with pytest.raises(recordio.RecordIOError, match=rf"{f} line 1: not text"):
    recordio.read_idx(str(f))


# --- 6. loader workers die with their parent ----------------------------------------------------

def _children(pid: int):
  out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
  return [int(a) for a, b in (l.split() for l in out.splitlines()) if int(b) == pid]


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  st = Path(f"/proc/{pid}/stat")
  return not (st.exists() and st.read_text().split()[2] == "Z")


@pytest.mark.slow
def test_loader_workers_exit_after_kill_9_of_the_parent(tmp_path):
  """Case 6; bug put back (no parent watch in FormatRecord): the two workers were still alive
  under PID 1 after the wait below."""
  code = textwrap.dedent("""
      import numpy as np, time
      from askd_jax.data import pipeline
      src = [{"image": np.zeros((4, 4, 3), np.uint8), "label": i} for i in range(64)]
      it = iter(pipeline.make_train_loader(src, global_batch_size=4, seed=0, worker_count=2))
      next(it)
      print("ready", flush=True)
      time.sleep(300)
  """)
  p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(),
                       stdout=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline().strip() == "ready"
    kids = _children(p.pid)
    assert len(kids) >= 2, kids  # two workers (and perhaps a resource tracker)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(k) for k in kids):
      time.sleep(0.2)
    assert not [k for k in kids if _alive(k)]
  finally:
    if p.poll() is None:
      p.kill()
