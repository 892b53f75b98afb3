"""Shared test set-up: CPU only, one persistent XLA cache for the whole test run (this
process and the CLI subprocesses it starts inherit it), a cheaper XLA:CPU compile for those
subprocesses (`cli_env`), and the tiny trained runs that several test files share, built
once per session even with pytest-xdist."""
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


# The suite's CLI runs and multi-device workers train a few steps of tiny models: their time
# is XLA:CPU compilation, not execution. At backend optimisation level 1 (LLVM -O1) instead
# of the default 2 they compile in ~60% of the CPU time (the cold TINY_FACEREC run below:
# 114 -> 68 s of CPU on 2 cores; the same results but one threshold, 1e-3 off).
# Level 0 (what `jax_disable_most_optimizations` sets) compiles faster still, but its
# programs give NaN gradients in the iResNet-CBAM and ResNet-CBAM train steps, so it is not
# used. This pytest process keeps the default level: the fusion and HLO checks
# (test_ops.py, test_layers.py), the benchmark and trace-count tests and the torch parity
# tests test the program production runs. XLA_FLAGS is part of JAX's persistent-cache key,
# so the two levels never share a cache entry.
CLI_XLA_FLAGS = "--xla_backend_optimization_level=1"


def cli_env(env=None, **extra) -> dict:
  """The environment for a subprocess that runs the package's CLI or a test worker:
  `env` (default os.environ) and `extra`, with CLI_XLA_FLAGS added to its XLA_FLAGS."""
  out = dict(os.environ if env is None else env, **extra)
  out["XLA_FLAGS"] = f"{out.get('XLA_FLAGS', '')} {CLI_XLA_FLAGS}".strip()
  return out


def run_main(workdir, *args, timeout=1500):
  """`python -m askd_jax.main --workdir=WORKDIR ARGS` from the repository root."""
  cmd = [sys.executable, "-m", "askd_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=_ROOT, env=cli_env(), capture_output=True, text=True,
                        timeout=timeout)


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



# pytest-xdist scheduling (pyproject.toml: `--dist loadfile --no-loadscope-reorder`). The
# suite's time on 2 workers is a few long tests and modules whose module-scoped fixtures
# train something. `loadfile` keeps each module on one worker: plain `load` can hand a
# module's tests to both workers, and each then builds its module fixtures. (`loadgroup`
# would allow finer groups, but pytest-xdist 3.8 cannot mark them under pytest 9.) LONG_FIRST
# hands the long modules out first, so that the short ones fill in at the end and the two
# workers finish together; the users of the session's tiny_facerec_run (test_main.py first,
# test_notebooks.py and test_use_model.py much later) are spread out so that one worker
# rarely waits on the other's file lock. Seconds: a cold CI run on a loaded 2-core machine.
LONG_FIRST = [
    "test_sharding.py",            # `equiv`: 1 vs 4 devices, 180 s
    "test_multihost.py",           # `runs`: 3 multi-process phases, 170 s; 75 s
    "test_reliability.py",         # `ref_run`, `interrupted`: 145 s; 45 s
    "test_compare.py",             # 130 s
    "test_detection_task.py",      # 125 s
    "test_main.py",                # tiny_facerec_run: 95 s
    "test_signals.py",             # 60 s, 45 s
    "test_real_face_data_run.py",  # 90 s
    "test_classification.py",      # 70 s, 65 s
    "test_tinaface.py",            # 50 s, 45 s
]


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = item.path.name
    return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

  items.sort(key=rank)  # stable: collection order within a rank
