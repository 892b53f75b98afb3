"""Reliability of training runs: exact resume after SIGKILL, graceful SIGTERM, corrupt
checkpoints, the NaN guard, the workdir guard and the teacher check on resume.

The end-to-end tests drive the real CLI (`python -m askd_jax.main`) in subprocesses on a tiny
model (16 px ORL faces, width 0.125, 8 steps per stage, a teacher and one A-SKD student),
sharing one JAX compilation cache so restarts do not recompile. CPU, float32, fixed seed.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
BASE = ["--config=configs/facerec.py", "--config.data.image_size=16", "--config.model.width=0.125",
        "--config.model.embedding_dim=16", f"--config.train.steps={STEPS}",
        "--config.train.batch_size=8", "--config.train.checkpoint_every=2",
        "--config.train.log_every=2", "--config.train.keep=2", "--config.student.sizes=7,",
        "--config.student.methods=askd", "--config.student.eval_teacher_lr=False"]
STAGES = ("teacher", "student_askd_7px")
TIMEOUT = 400


# --- helpers -------------------------------------------------------------------------------

def _shared_dir(tmp_path_factory, name: str) -> Path:
  """A directory every pytest-xdist worker of this session sees (the parent of theirs)."""
  base = tmp_path_factory.getbasetemp()
  d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"reliability_{name}"
  d.mkdir(exist_ok=True)
  return d


def _once(tmp_path_factory, name: str, build) -> tuple:
  """Run build(dir) -> JSON-able info once per session, whichever worker comes first."""
  d = _shared_dir(tmp_path_factory, name)
  done = d / "done.json"
  with open(d / "lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        done.write_text(json.dumps(build(d)))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return d, json.loads(done.read_text())


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list:
  """Overrides every run shares: one tfds dir for the 16 px ORL build, the XLA cache."""
  tfds = _shared_dir(tmp_path_factory, "tfds")
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cache = ""  # leave JAX on the persistent cache tests/conftest.py sets
  else:
    cache = str(_shared_dir(tmp_path_factory, "xla"))
  return [f"--config.data.data_dir={tfds}", f"--config.jax_cache_dir={cache}"]


def _cmd(workdir, common, *extra):
  return [sys.executable, "-m", "askd_jax.main", *BASE, *common, f"--workdir={workdir}", *extra]


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller set
  return cli_env(env)


class Proc:
  """A CLI run whose stdout/stderr go to files (no pipe can fill and block it)."""

  def __init__(self, cmd, logdir: Path, name: str):
    self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
    self._fo, self._fe = open(self.out, "w"), open(self.err, "w")
    self.p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=self._fo, stderr=self._fe)

  def wait(self, timeout=TIMEOUT) -> int:
    try:
      rc = self.p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.p.kill()
      self.p.wait()
      raise
    finally:
      self._fo.close()
      self._fe.close()
    return rc

  def poll_until(self, cond, timeout=TIMEOUT) -> bool:
    """Wait until cond() holds (True) or the process ended (False)."""
    deadline = time.time() + timeout
    while self.p.poll() is None and time.time() < deadline:
      if cond():
        return True
      time.sleep(0.02)
    return False

  @property
  def stdout(self) -> str:
    return self.out.read_text()

  @property
  def stderr(self) -> str:
    return self.err.read_text()


def run_cli(cmd, logdir: Path, name: str, timeout=TIMEOUT):
  p = Proc(cmd, logdir, name)
  rc = p.wait(timeout)
  return rc, p.stdout, p.stderr


def ckpt_steps(workdir, stage=None) -> set:
  """{(stage, step)} of the complete checkpoint steps under the workdir."""
  out = set()
  for d in glob.glob(os.path.join(workdir, stage or "*", "checkpoints", "*")):
    if os.path.basename(d).isdigit():
      out.add((Path(d).parents[1].name, int(os.path.basename(d))))
  return out


def final_arrays(stage_dir) -> dict:
  """Every array of the newest checkpoint step's train state, by path."""
  import jax
  import orbax.checkpoint as ocp
  from askd_jax.train import state_io
  mgr = state_io.manager(os.path.join(stage_dir, "checkpoints"), read_only=True)
  step = mgr.latest_step()
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = jax.tree_util.tree_flatten_with_path(out["state"])[0]
  arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  arrays["__step__"] = np.asarray(step)
  return arrays


def assert_same_final(ref_dir, other_dir):
  for stage in STAGES:
    a, b = final_arrays(os.path.join(ref_dir, stage)), final_arrays(os.path.join(other_dir, stage))
    assert int(a["__step__"]) == int(b["__step__"]) == STEPS
    assert sorted(a) == sorted(b)
    diff = [k for k in a if not (a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]))]
    assert not diff, f"{stage}: {len(diff)} of {len(a)} arrays differ, e.g. {diff[:3]}"
  rows = lambda d: {k: v for k, v in json.loads((Path(d) / "results.json").read_text()).items()
                    if k != "meta"}  # meta holds the wall time
  assert rows(other_dir) == rows(ref_dir)


def one_error_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, common) -> Path:
  """One uninterrupted run: the parameters every interrupted run must end with."""
  def build(d):
    rc, out, err = run_cli(_cmd(d / "w", common), d, "ref")
    assert rc == 0, err[-3000:]
    return {}
  d, _ = _once(tmp_path_factory, "ref", build)
  assert all((d / "w" / s / "DONE").exists() for s in STAGES)
  return d / "w"


# --- exact resume, SIGTERM, corrupt newest checkpoint -------------------------------------------

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, common) -> tuple:
  """The same command run to the end through SIGKILLs at random moments and one SIGTERM:

  run 1 and 2: SIGKILL 0-0.6 s after 1-2 new checkpoints (any step, maybe mid-save);
  run 3: SIGTERM once the student has two checkpoints (a copy of the workdir is kept);
  run 4: SIGKILL as in run 1 if it is still training; then runs until it exits 0.
  Run n puts 1 + n % 3 batches on the device ahead of the step (data.prefetch; the reference
  run 2): a checkpoint must hold the position after the batches consumed, not those read.
  """
  def build(d):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    w = d / "w"
    info = {"seed": seed, "kills": [], "codes": []}
    for n in range(1, 9):
      # data.prefetch changes between runs: the saved input position is the consumed one
      p = Proc(_cmd(w, common, f"--config.data.prefetch={1 + n % 3}"), d, f"run{n}")
      seen = ckpt_steps(w)
      if n == 3:
        student = lambda: ckpt_steps(w, STAGES[1])
        if p.poll_until(lambda: len(student()) >= 2 and student() - seen):
          p.p.send_signal(signal.SIGTERM)
      elif n in (1, 2, 4):
        want = rng.randint(1, 2)
        if p.poll_until(lambda: len(ckpt_steps(w) - seen) >= want):
          time.sleep(rng.uniform(0.0, 0.6))
          p.p.send_signal(signal.SIGKILL)
          info["kills"].append(sorted(ckpt_steps(w) - seen))
      code = p.wait()
      info["codes"].append(code)
      if n == 3:
        info.update(term_rc=code, term_out=p.stdout, term_err=p.stderr[-3000:],
                    term_steps=sorted(ckpt_steps(w)))
        shutil.copytree(w, d / "after_sigterm")
      elif code == 0 and n > 3:
        break
      assert code in (0, -signal.SIGKILL), f"run {n} exited {code}: {p.stderr[-3000:]}"
    print(f"seed {seed}: SIGKILL after new checkpoints {info['kills']}, exit codes "
          f"{info['codes']}")
    return info
  return _once(tmp_path_factory, "interrupted", build)


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bit_for_bit(ref_run, interrupted):
  d, info = interrupted
  assert info["codes"][-1] == 0, info
  assert len(info["kills"]) >= 2, f"finished before it was killed twice: {info}"
  assert_same_final(ref_run, d / "w")
  assert not glob.glob(str(d / "w" / "*" / "checkpoints" / "*tmp*")), "a partial step was left"


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_with_resume_message(interrupted):
  d, info = interrupted
  assert info["term_rc"] == 0, info["term_err"]
  m = re.search(r"SIGTERM received: stage (\S+) stopped after step (\d+) and saved a checkpoint "
                r"in (\S+); run the same command again to resume", info["term_out"])
  assert m, info["term_out"][-2000:]
  stage, step = m.group(1), int(m.group(2))
  assert stage == STAGES[1] and 3 <= step < STEPS, m.group(0)
  w = d / "after_sigterm"
  assert Path(m.group(3)) == d / "w" / stage
  steps = {s for g, s in ckpt_steps(w) if g == stage}
  assert max(steps) == step and len(steps) == 2
  assert int(final_arrays(w / stage)["['step']"]) == step  # the state inside says so too
  assert not (w / stage / "DONE").exists()


def _corrupt_newest(stage_dir: Path) -> int:
  steps = sorted(int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) >= 2, steps
  files = [f for f in (stage_dir / "checkpoints" / str(steps[-1]) / "state").rglob("*")
           if f.is_file() and "/d/" in str(f)]
  big = max(files, key=lambda f: f.stat().st_size)  # the largest array data file
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0xFF  # one flipped byte: orbax may restore it without complaint
  big.write_bytes(bytes(data))
  return steps[-1]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_finishes_bit_for_bit(ref_run, interrupted,
                                                                       common, tmp_path):
  d, _ = interrupted
  w = tmp_path / "w"  # also a moved workdir: the teacher path changes, its parameters do not
  shutil.copytree(d / "after_sigterm", w)
  bad = _corrupt_newest(w / STAGES[1])
  older = max(s for _, s in ckpt_steps(w, STAGES[1]) if s < bad)
  rc, out, err = run_cli(_cmd(w, common), tmp_path, "resume")
  assert rc == 0, err[-3000:]
  assert re.search(rf"checkpoint step {bad} in \S+ is unreadable .*falling back to step {older}",
                   err), err[-3000:]
  assert "the teacher moved from" in err
  assert glob.glob(str(w / STAGES[1] / "checkpoints" / f"{bad}.unreadable-*"))
  assert_same_final(ref_run, w)


def test_all_checkpoints_corrupt_is_refused_clearly(tmp_path):
  import jax.numpy as jnp
  from askd_jax.train import state_io
  mgr = state_io.manager(str(tmp_path / "ck"))
  st = {"w": jnp.arange(64.0)}
  for s in (1, 2):
    state_io.save(mgr, s, st, None, {})
  for s in (1, 2):
    for f in (tmp_path / "ck" / str(s) / "state").rglob("manifest.ocdbt"):
      f.write_bytes(b"garbage")
  with pytest.raises(state_io.CheckpointError, match=r"none of the checkpoint steps \[1, 2\] can "
                     r"be read .*delete the directory"):
    state_io.restore_latest(state_io.manager(str(tmp_path / "ck")), st)


def test_state_io_save_is_idempotent_and_cleans_partial_steps(tmp_path):
  import jax.numpy as jnp
  from askd_jax.train import state_io
  ck = tmp_path / "ck"
  mgr = state_io.manager(str(ck))
  st = {"w": jnp.arange(8.0)}
  assert state_io.save(mgr, 3, st, b'{"pos": 1}', {"a": 1})
  assert not state_io.save(mgr, 3, st, None, {})  # SIGTERM right after a periodic save
  (ck / "5.orbax-checkpoint-tmp-1700000000").mkdir()  # a writer killed mid-save
  mgr = state_io.manager(str(ck))
  assert mgr.all_steps() == [3]  # never listed as a step
  step, out, data, meta = state_io.restore_latest(mgr, st)
  assert step == 3 and data == b'{"pos": 1}' and meta["a"] == 1 and meta["state_hash"]
  np.testing.assert_array_equal(out["w"], np.arange(8.0))
  assert state_io.save(mgr, 5, st, None, {})  # the next save waits for the clean-up
  assert mgr.all_steps() == [3, 5] and not (ck / "5.orbax-checkpoint-tmp-1700000000").exists()


# --- NaN guard -------------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_stop_names_step_and_terms_keeps_last_good_then_skip_counts(common, tmp_path):
  w = tmp_path / "w"
  cmd = _cmd(w, common, "--config.train.lr=1e30", "--config.student.sizes=()",
             "--config.train.checkpoint_every=1")
  rc, out, err = run_cli(cmd, tmp_path, "stop")
  assert rc == 1, err[-3000:]
  line = one_error_line(err)
  m = re.fullmatch(r"error: stage teacher: non-finite loss or gradient at step (\d+) \((.*)\); "
                   r"1 step\(s\) skipped so far; the last good checkpoint is kept\. .*"
                   r"nan_policy=skip", line)
  assert m, line
  bad = int(m.group(1))
  terms = dict(kv.split("=") for kv in m.group(2).split(", "))
  assert sorted(terms) == ["distill_loss", "grad_norm", "loss", "task_loss"], terms
  assert not np.isfinite(float(terms["loss"]))
  assert max(s for _, s in ckpt_steps(w)) == bad - 1  # nothing saved from the bad step on
  log = (w / "run.log").read_text()  # the full trace goes to the workdir's log, not stderr
  assert "Traceback" in log and "NonFiniteError" in log and "phase compile teacher" in log
  last = final_arrays(w / "teacher")
  assert int(last["__step__"]) == bad - 1 and int(last["['bad_steps']"]) == 0
  assert all(np.isfinite(v).all() for k, v in last.items() if v.dtype.kind == "f")

  # As the message advises: the same command with nan_policy=skip resumes (the workdir guard
  # lets that change through, and one of the runtime's: tune_cpu), skips and counts bad
  # steps, and stops past max_bad_steps.
  rc, out, err = run_cli(cmd + ["--config.train.nan_policy=skip", "--config.train.max_bad_steps=2",
                                "--config.tune_cpu=False"], tmp_path, "skip")
  assert rc == 1, err[-3000:]
  assert re.search(rf"non-finite loss or gradient at step {bad} .*; 1 step\(s\) skipped so far",
                   err), err[-3000:]  # the warning of the first skipped step
  line = one_error_line(err)
  assert re.search(rf"at step {bad} .*; 3 step\(s\) skipped so far", line), line
  last = final_arrays(w / "teacher")
  assert int(last["__step__"]) == bad + 1 and int(last["['bad_steps']"]) == 2  # went on past it
  assert int(last["['first_bad_step']"]) == bad - 1


# --- workdir guard and teacher check -------------------------------------------------------------

def test_workdir_guard_refuses_another_config(ref_run, common, tmp_path):
  before = (ref_run / "config.json").read_text()
  rc, out, err = run_cli(_cmd(ref_run, common, "--config.train.lr=0.05"), tmp_path, "guard")
  assert rc == 1
  line = one_error_line(err)
  assert str(ref_run) in line and "--overwrite" in line and "another config" in line
  assert (ref_run / "config.json").read_text() == before


def _get_config(preset="demo"):
  from askd_jax import experiment
  return experiment.load_config(f"{REPO / 'configs' / 'facerec.py'}:{preset}")


def test_workdir_guard_overwrite_moves_old_run_aside(tmp_path):
  from askd_jax import experiment
  get_config = _get_config
  w = tmp_path / "w"
  a, b = get_config("demo"), get_config("demo")
  b.train.lr = 0.05
  experiment.guard_workdir(str(w), a, overwrite=False)
  (w / "teacher").mkdir()
  c = get_config("demo")
  c.train.checkpoint_every, c.train.nan_policy, c.jax_cache_dir = 7, "skip", "/elsewhere"
  experiment.guard_workdir(str(w), c, overwrite=False)  # same run: only how it is checkpointed differs
  from askd_jax.workdir import WorkdirError
  with pytest.raises(WorkdirError, match="holds a run with another config"):
    experiment.guard_workdir(str(w), b, overwrite=False)
  experiment.guard_workdir(str(w), b, overwrite=True)
  old = glob.glob(str(tmp_path / "w.old-*"))
  assert len(old) == 1 and os.path.isdir(os.path.join(old[0], "teacher"))
  assert not (w / "teacher").exists()
  saved = json.loads((w / "config.json").read_text())
  assert saved["config"]["train"]["lr"] == 0.05


@pytest.mark.slow
def test_student_resume_refuses_a_changed_teacher(ref_run, common, tmp_path):
  # (A moved workdir, same teacher parameters at another path, resumes: see the corrupt test.)
  w = tmp_path / "w"
  shutil.copytree(ref_run, w)
  for f in ("DONE", "eval.json"):  # the student stage is unfinished again
    (w / STAGES[1] / f).unlink()
  # An older teacher now loads: its final step is gone and its model.json, like one written
  # before model.json named the final step, has no trained_steps (with them, the finished
  # teacher is refused instead: tests/test_reliability3.py, issue 33 case 1).
  spec = json.loads((w / "teacher" / "model.json").read_text())
  del spec["trained_steps"]
  (w / "teacher" / "model.json").write_text(json.dumps(spec))
  shutil.rmtree(w / "teacher" / "checkpoints" / str(STEPS))
  rc, out, err = run_cli(_cmd(w, common), tmp_path, "changed")
  assert rc == 1, err[-3000:]
  line = one_error_line(err)
  assert re.search(r"this student was trained up to step \d+ against teacher .*params hash "
                   r"\w+\), but student\.teacher now loads .*params hash \w+\); restore that "
                   r"teacher", line), line
  assert not (w / STAGES[1] / "DONE").exists()


# --- issue 21: a finished workdir under other configs, corrupt steps, --evaluate -----------------

def _stderr_ok(err: str) -> None:
  """No traceback, at most 3 lines besides progress bars and our own warnings."""
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip() and "it/s" not in l and "s/it" not in l]
  assert len(lines) <= 3, err[-3000:]


@pytest.mark.slow
def test_other_config_without_config_json_is_refused_and_writes_nothing(ref_run, common,
                                                                        tmp_path):
  """Case 2 via the CLI: bug put back (guard reading config.json only): exit 0 with the old
  models' table printed as the new width's, config.json rewritten."""
  w = tmp_path / "w"
  shutil.copytree(ref_run, w)
  (w / "config.json").unlink()
  rc, out, err = run_cli(_cmd(w, common, "--config.model.width=0.25"), tmp_path, "other")
  assert rc == 1, err[-3000:]
  line = one_error_line(err)
  assert re.search(rf"{w}/\S+ was trained with another config \(changed: model.width 0.125 "
                   rf"-> 0.25; recorded in {w}/\S+\); run it with the config it was trained "
                   "with", line), line
  _stderr_ok(err)
  assert not (w / "config.json").exists() and "Teacher" not in out
  rc, out, err = run_cli(_cmd(w, common), tmp_path, "same")  # the original command still runs
  assert rc == 0, err[-3000:]
  assert json.loads((w / "results.json").read_text())["rows"] == json.loads(
      (ref_run / "results.json").read_text())["rows"]


@pytest.mark.slow
def test_truncated_newest_step_is_one_warning_line(ref_run, common, tmp_path):
  """Case 7: every array file of the newest step truncated printed 12,090 lines (orbax's
  asyncio callbacks); now one warning per step set aside, and the run resumes."""
  w = tmp_path / "w"
  shutil.copytree(ref_run, w)
  st = w / STAGES[1]
  for f in ("DONE", "eval.json", "model.json"):
    (st / f).unlink()
  for f in (st / "checkpoints" / str(STEPS) / "state").rglob("*"):
    if f.is_file() and "/d/" in str(f):
      f.write_bytes(f.read_bytes()[:10])
  rc, out, err = run_cli(_cmd(w, common), tmp_path, "truncated")
  assert rc == 0, err[-3000:]
  assert len(re.findall(rf"checkpoint step {STEPS} in \S+ is unreadable", err)) == 1, err[-3000:]
  _stderr_ok(err)
  assert_same_final(ref_run, w)


@pytest.mark.slow
def test_evaluate_other_input_size(ref_run, common, tmp_path):
  """Case 8: --evaluate on a model of another input size (a shape traceback before). A model
  directory where eval.json cannot be written: tests/test_eval_cache.py::
  test_unwritable_eval_json_warns_and_leaves_nothing_partial (a failing write that bites as
  root too, which a read-only chmod does not)."""
  rc, out, err = run_cli(_cmd(tmp_path / "unused", common, f"--evaluate={ref_run / 'teacher'}",
                              "--config.data.image_size=32"), tmp_path, "size")
  assert rc == 2
  assert one_error_line(err) == (f"error: {ref_run / 'teacher'} holds a model for 16 px input, "
                                 "but config.data.image_size is 32; pass "
                                 "--config.data.image_size=16 (or the config it was trained "
                                 "with)")
  _stderr_ok(err)
