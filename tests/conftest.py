"""Shared test set-up: CPU only, one persistent XLA cache for the whole test run (this
process and the CLI subprocesses it starts inherit it), cheaper XLA:CPU compiles (TEST_XLA_FLAGS),
and the tiny trained runs that several test files share, built once per session even with
pytest-xdist."""
from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The suite trains and differentiates tiny models for a few steps: its time is XLA:CPU
# compilation, not execution. Two code-generation flags cut it; they change how XLA:CPU turns
# the optimised HLO into machine code, not the program: the HLO passes, fusion decisions,
# shardings and trace counts the tests check are the same, and the numbers agree with the
# default flags' to float32 rounding (~1e-6 on the tiny runs' losses). Measured, 2-core x86_64,
# jax 0.10.2, cold cache: backend optimisation level 1 (LLVM -O1) instead of 2 took the tiny
# CLI run below from 114 to 68 s of CPU; the older elemental fusion code generation instead
# of the MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`) a further 82 -> 55 s of
# CPU (62 -> 44 s wall; its student step compiles in 4.1 instead of 7.7 s); test_ops.py,
# test_layers.py, test_parity_model.py and test_models.py run in 79 instead of 139 s.
# Level 0 (what `jax_disable_most_optimizations` sets) compiles faster still, but its
# programs give NaN gradients in the iResNet-CBAM and ResNet-CBAM train steps, so it is not
# used. XLA's default flags still run here: the session's shared tiny CLI run
# (`tiny_facerec_run`) compiles as a user's run does (`production_env()`), and
# ASKD_TEST_XLA_DEFAULTS=1 runs the whole suite with them. The speed of the default code
# (docs/benchmarks.md) is measured by askd_jax.tools.bench outside the tests.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"


def _add_flags(env: dict) -> dict:
  if os.environ.get("ASKD_TEST_XLA_DEFAULTS") != "1" and TEST_XLA_FLAGS not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
  return env


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_add_flags(os.environ)  # before this process's JAX backend starts (XLA reads it then)

# The CLI's tiny face run: 28 px ORL, width 0.125, 4 steps per stage, one 7 px student per
# method. `--config.jax_cache_dir=` leaves the cache to JAX_COMPILATION_CACHE_DIR above.
TINY_FACEREC = ["--config=configs/facerec.py", "--config.data.image_size=28",
                "--config.model.width=0.125", "--config.model.embedding_dim=32",
                "--config.train.steps=4", "--config.train.batch_size=8",
                "--config.train.log_every=2", "--config.train.checkpoint_every=2",
                "--config.student.sizes=7,", "--config.student.methods=none,askd",
                "--config.data.num_pairs=200", "--config.jax_cache_dir="]


def tiny_facerec_cfg(data_dir):
  """The config of `python -m askd_jax.main TINY_FACEREC --config.data.data_dir=DATA_DIR`
  (the same config hash: experiment.run in process continues the CLI's tiny run)."""
  from askd_jax import experiment
  return experiment.load_config(str(_ROOT / TINY_FACEREC[0].removeprefix("--config=")),
                                [*TINY_FACEREC[1:], f"--config.data.data_dir={data_dir}"])


def cli_env(env=None, **extra) -> dict:
  """The environment for a subprocess that runs the package's CLI or a test worker:
  `env` (default os.environ) and `extra`, with TEST_XLA_FLAGS in its XLA_FLAGS."""
  return _add_flags(dict(os.environ if env is None else env, **extra))


def production_env(**extra) -> dict:
  """os.environ and `extra` with XLA's default flags: what a user's run compiles."""
  out = dict(os.environ, **extra)
  out["XLA_FLAGS"] = " ".join(f for f in out.get("XLA_FLAGS", "").split()
                              if f not in TEST_XLA_FLAGS.split())
  return out


def run_main(workdir, *args, timeout=1500, env=None):
  """`python -m askd_jax.main --workdir=WORKDIR ARGS` from the repository root (env:
  cli_env())."""
  cmd = [sys.executable, "-m", "askd_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=_ROOT, env=env or cli_env(), capture_output=True, text=True,
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
          r = run_main(wd, *TINY_FACEREC, f"--config.data.data_dir={data}",
                       env=production_env())  # the one tiny run compiled as a user's is
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
# workers finish together; test_main.py, the first user of the session's tiny_facerec_run,
# comes before its later users (test_notebooks.py, test_use_model.py), so that they rarely
# wait on its file lock. Seconds: the module's total in a cold `--durations=0` run on the
# 2-core machine with both workers busy, before TEST_XLA_FLAGS (~0.6x now); only the order
# matters (tests/test_suite.py checks the names).
LONG_FIRST = [
    "test_rehearse.py",            # three quick rehearsals: 380 s
    "test_reliability.py",         # `ref_run`, `interrupted`, the CLI cases: 280 s
    "test_multihost.py",           # `runs`: 3 multi-process phases, 270 s
    "test_sharding.py",            # `equiv`: 1 vs 4 devices, 250 s
    "test_reliability3.py",        # CLI re-runs of tiny_facerec_run copies: 226 s alone
    "test_signals.py",             # 205 s
    "test_detection_task.py",      # 200 s
    "test_main.py",                # tiny_facerec_run: 110 s
    "test_classification.py",      # 135 s
    "test_compare.py",             # 130 s
    "test_official_eval_e2e.py",   # 125 s
    "test_onnx_export.py",         # full R50 conversion + the demo's exports: 130 s
    "test_tinaface.py",            # 105 s
    "test_real_face_data_run.py",  # 55 s
]


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = item.path.name
    return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

  items.sort(key=rank)  # stable: collection order within a rank
