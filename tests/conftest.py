"""Shared test set-up: CPU only, one persistent XLA cache for the whole test run (this
process and the CLI subprocesses it starts inherit it), and the tiny trained runs that
several test files share, built once per session even with pytest-xdist."""
from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The CLI's tiny face run: 28 px ORL, width 0.125, 4 steps per stage, one 7 px student per
# method. `--config.jax_cache_dir=` leaves the cache to JAX_COMPILATION_CACHE_DIR above.
TINY_FACEREC = ["--config=configs/facerec.py", "--config.data.image_size=28",
                "--config.model.width=0.125", "--config.model.embedding_dim=32",
                "--config.train.steps=4", "--config.train.batch_size=8",
                "--config.train.log_every=2", "--config.train.checkpoint_every=2",
                "--config.student.sizes=7,", "--config.student.methods=none,askd",
                "--config.data.num_pairs=200", "--config.jax_cache_dir="]


def tiny_facerec_cfg(data_dir):
  """TINY_FACEREC as a ConfigDict, for calling askd_jax.experiment in process (the same
  config hash: experiment.run continues the CLI's tiny run)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("facerec_config", _ROOT / "configs" / "facerec.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.image_size, c.data.num_pairs, c.data.data_dir = 28, 200, str(data_dir)
  c.model.width, c.model.embedding_dim = 0.125, 32
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 8, 2, 2
  c.student.sizes, c.student.methods = (7,), ("none", "askd")
  c.jax_cache_dir = ""
  return c


def run_main(workdir, *args, timeout=1500):
  """`python -m askd_jax.main --workdir=WORKDIR ARGS` from the repository root."""
  cmd = [sys.executable, "-m", "askd_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=timeout)


def session_dir(tmp_path_factory, name: str) -> pathlib.Path:
  """A directory every xdist worker of this session sees: the workers' base temp dirs share
  their parent (pytest-xdist docs, "making session-scoped fixtures execute only once")."""
  base = tmp_path_factory.getbasetemp()
  d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
  d.mkdir(exist_ok=True)
  return d


@pytest.fixture(scope="session")
def tiny_facerec_run(tmp_path_factory):
  """(workdir, tfds data_dir, stdout of the run) of one TINY_FACEREC run per session: the
  first worker trains it under a file lock, the others wait and find it done (or find why
  it failed, without training it again)."""
  shared = session_dir(tmp_path_factory, "tiny_facerec_run")
  wd, data = shared / "wd", shared / "tfds"
  done, failed = shared / "stdout.txt", shared / "failed.txt"
  with open(shared / "lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists() and not failed.exists():
        try:
          r = run_main(wd, *TINY_FACEREC, f"--config.data.data_dir={data}")
        except subprocess.TimeoutExpired as e:
          failed.write_text(f"timed out after {e.timeout} s")
        else:
          (done if r.returncode == 0 else failed).write_text(
              r.stdout if r.returncode == 0 else r.stdout[-3000:] + r.stderr[-3000:])
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  assert not failed.exists(), "the tiny CLI run failed:\n" + failed.read_text()
  return wd, data, done.read_text()
