"""Train a teacher and its low-resolution students, evaluate them, write the report.

    python -m askd_jax.main --config=configs/facerec.py            # the demo, CPU, minutes
    python -m askd_jax.main --config=configs/facerec.py:casia --config.data.manual_dir=...
    python -m askd_jax.main --config=configs/facerec.py --evaluate=WORKDIR/student_askd_7px

Re-running the same command resumes: finished stages are skipped and an unfinished one
continues from its newest checkpoint. SIGTERM/SIGINT finish the step, checkpoint, exit 0.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import signal
import sys
import time
from typing import Any, Dict, List

from absl import app, flags
from ml_collections import config_flags


def _fail(msg: str, code: int = 2) -> None:
  """A usage error: one line on stderr, no traceback."""
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def _flag_error(e: BaseException) -> str:
  """One line from a flag/config parsing error (ml_collections embeds the config file's
  traceback in its message: keep the flag and the exception's last line)."""
  if isinstance(e, (AttributeError, KeyError)):  # --config.a.b=v naming no field
    text = str(e).replace("\\", "")
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    arg = next((a for a in sys.argv[1:] if key and a.startswith("--config.")
                and a.split("=")[0].endswith("." + key.group(1))), "a --config.* override")
    return (f"{arg}: the config has no field {key.group(1) if key else text!r}"
            + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
            + "; see the config file for the fields")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if len(lines) > 1:
    head = lines[0].split(": Error whilst")[0].removeprefix("flag ")
    return f"{head}: {re.sub(r'^[A-Za-z]*Error: ', '', lines[-1])}"
  if isinstance(e, flags.IllegalFlagValueError):
    return f"{lines[0].removeprefix('flag ')}; give a value of the field's type"
  return lines[0] if lines else type(e).__name__


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, OSError, AttributeError, KeyError) as e:
    _fail(_flag_error(e))


try:  # ml_collections applies --config.* overrides already here, at definition
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/facerec.py",
                                            "Config file, optionally :PRESET.", lock_config=True)
except (flags.Error, OSError, AttributeError, KeyError) as _e:
  _fail(_flag_error(_e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the report go "
                               "(default: ./workdir/<task>_<preset>).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds another "
                               "config's run (the old one is moved to WORKDIR.old-<time>).")
_EVALUATE = flags.DEFINE_string("evaluate", None, "Only evaluate this model directory (a stage "
                                "dir or a converted checkpoint) and print its accuracy.")
_SIZES = flags.DEFINE_string("eval_sizes", "", "With --evaluate: comma-separated LR sizes "
                             "(empty: high resolution).")


def setup(cfg) -> None:
  import jax
  if cfg.get("jax_cache_dir"):
    path = os.path.expanduser(cfg.jax_cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  if cfg.get("tune_cpu", True):  # before JAX creates its devices; see askd_jax/runtime.py
    from askd_jax.runtime import tune_cpu
    tune_cpu()
  if cfg.get("distributed"):  # arguments from JAX_* env vars, else SLURM/MPI/TPU auto-detection
    from askd_jax.train.sharding import initialize_distributed
    initialize_distributed()
  # orbax and matplotlib are chatty at INFO/WARNING about things that are not the user's problem.
  for name in ("absl", "matplotlib", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except Exception:
    pass


def plan_stages(cfg, workdir: str):
  from askd_jax.train.loop import Stage
  teacher_dir = cfg.student.teacher or os.path.join(workdir, "teacher")
  stages = []
  if not cfg.student.teacher:
    stages.append(Stage("teacher", "teacher"))
  for size in cfg.student.sizes:
    for method in cfg.student.methods:
      stages.append(Stage(f"student_{method}_{size}px", "student", method, (int(size),),
                          teacher_dir))
  return stages


def guard_workdir(workdir: str, cfg, overwrite: bool) -> None:
  """Refuse to mix two configs' runs in one workdir unless asked to start afresh."""
  from askd_jax.train.loop import cfg_hash
  path = os.path.join(workdir, "config.json")
  mine = {"config_hash": cfg_hash(cfg), "config": json.loads(cfg.to_json_best_effort())}
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError:
        old = {"config_hash": "unreadable"}
    if old.get("config_hash") != mine["config_hash"]:
      if not overwrite:
        raise SystemExit(f"error: {workdir} holds a run with another config "
                         f"(hash {old.get('config_hash')} vs {mine['config_hash']}); use another "
                         "--workdir, or pass --overwrite to move the old run aside and start afresh")
      backup = f"{workdir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
      os.rename(workdir, backup)
      print(f"moved the previous run to {backup}")
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(mine, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def evaluate_stage(task, cfg, stage_dir: str, sizes_list) -> Dict[str, Any]:
  """Evaluate a model directory at each resolution; cached in STAGE/eval.json."""
  import jax.numpy as jnp
  from askd_jax.train import loop
  from askd_jax.train.checkpoint import load_model
  cache_path = os.path.join(stage_dir, "eval.json")
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  variables, spec = load_model(stage_dir)
  model = task.model(dtype=jnp.dtype(cfg.get("dtype", "float32")), spec=spec)
  out = {}
  for sizes in sizes_list:
    key = "HR" if not sizes else "/".join(map(str, sizes))
    if key not in cache:
      t = time.time()
      cache[key] = task.evaluate(model, variables, tuple(sizes))
      loop.record(stage_dir, event="eval", resolution=key, seconds=time.time() - t,
                  sets={k: v.get("seconds") for k, v in cache[key].items()})
    out[key] = cache[key]
  import jax
  if jax.process_index() == 0:  # several hosts: one writer
    with open(cache_path + ".tmp", "w") as f:
      json.dump(cache, f, indent=2)
    os.replace(cache_path + ".tmp", cache_path)
  return out


def run(cfg, workdir: str, overwrite: bool = False) -> List[Dict[str, Any]]:
  import jax
  from askd_jax import config_check, report
  from askd_jax.tasks import get_task
  from askd_jax.train import loop
  t0 = time.time()
  config_check.normalize(cfg)
  config_check.validate(cfg)
  is_main = jax.process_index() == 0
  if is_main:
    guard_workdir(workdir, cfg, overwrite)
  task = get_task(cfg)
  stages = plan_stages(cfg, workdir)
  writer_factory = _tensorboard(workdir)
  rows = []
  for stage in stages:
    stage_dir = loop.train_stage(cfg, task, stage, workdir, writer_factory=writer_factory)
    if stage.kind == "teacher":
      evals = [()] + ([(s,) for s in cfg.student.sizes] if cfg.student.get("eval_teacher_lr") else [])
    else:
      evals = [tuple(stage.sizes)]
    res = evaluate_stage(task, cfg, stage_dir, evals)
    for key, sets in res.items():
      for set_name, r in sets.items():
        rows.append({"stage": stage.name, "method": stage.method if stage.kind == "student"
                     else "teacher", "train_resolution": stage.resolution,
                     "eval_resolution": key, "set": set_name, **r})
  if is_main:
    meta = {"preset": cfg.get("preset"), "task": cfg.get("task"), "elapsed_s": time.time() - t0,
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, "
                       f"{jax.devices()[0].platform} x{jax.device_count()}",
            "jax": jax.__version__, "caption": getattr(task, "report_caption", None)}
    md = report.write_report(workdir, rows, meta)
    print("\n" + md)
    print(f"wrote {os.path.join(workdir, 'results.md')}, results.json, results.png")
  return rows


def _tensorboard(workdir):
  def factory(stage_name):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      return None
    return SummaryWriter(os.path.join(workdir, "tensorboard", stage_name))
  return factory


def main(argv):
  del argv
  cfg = _CONFIG.value
  try:
    cfg.get("task")  # ml_collections defers a missing config file's error to first use
  except OSError as e:
    _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}; give an existing config "
          "file, e.g. --config=configs/facerec.py")
  setup(cfg)
  from askd_jax.config_check import ConfigError
  from askd_jax.train.loop import NonFiniteError, Preempted
  from askd_jax.train.state_io import CheckpointError
  workdir = _WORKDIR.value or os.path.join("workdir", f"{cfg.task}_{cfg.get('preset', 'run')}")

  def outside_step(signum, frame):  # a stage's loop installs its own finish-step-and-save flag
    raise Preempted(f"{signal.Signals(signum).name} received outside a training step, nothing "
                    "to save; run the same command again to resume")

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, outside_step)
  try:
    if _EVALUATE.value:
      from askd_jax.tasks import get_task
      sizes = tuple(int(s) for s in _SIZES.value.split(",") if s)
      res = evaluate_stage(get_task(cfg), cfg, _EVALUATE.value, [sizes])
      print(json.dumps(res, indent=2))
      return
    run(cfg, workdir, _OVERWRITE.value)
  except Preempted as e:
    _close_progress_bars()
    print(str(e))
    sys.exit(0)
  except ConfigError as e:
    _fail(str(e), 2)
  except (NonFiniteError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
    _close_progress_bars()
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)


def _close_progress_bars() -> None:
  """End a progress bar left mid-line, so the message below starts a line of its own."""
  try:
    from tqdm import tqdm
  except ImportError:
    return
  for bar in list(getattr(tqdm, "_instances", ())):
    bar.close()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
