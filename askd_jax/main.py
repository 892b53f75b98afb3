"""Train a teacher and its low-resolution students, evaluate them, write the report.

    python -m askd_jax.main --config=configs/facerec.py            # the demo, CPU, minutes
    python -m askd_jax.main --config=configs/facerec.py:casia --config.data.manual_dir=...
    python -m askd_jax.main --config=configs/facerec.py --evaluate=WORKDIR/student_askd_7px

Re-running the same command resumes: finished stages are skipped and an unfinished one
continues from its newest checkpoint. SIGTERM/SIGINT finish the step, checkpoint, exit 0.
Failures end with one `error: ...` line (exit 1 at run time, 2 for a usage error); the full
trace goes to WORKDIR/run.log, and to stderr with --verbose.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import sys
import time
import traceback
from typing import Any, Dict, List

from askd_jax import stop

if __name__ == "__main__":  # honour Ctrl-C / SIGTERM from the first moment (imports take seconds)
  stop.install()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

LOG_FILE = "run.log"
log = logging.getLogger("askd_jax")


def last_value_per_field(argv: List[str]) -> List[str]:
  """Keep only the last `--config.FIELD=...` of each field (ml_collections appends repeated
  tuple overrides and ignores a later empty one; every other flag takes its last value)."""
  keyed = []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(argv):  # --config.f VALUE
      keyed.append((a, [a, argv[i + 1]]))
      i += 2
      continue
    keyed.append((a.split("=", 1)[0] if a.startswith("--config.") else None, [a]))
    i += 1
  last = {k: n for n, (k, _) in enumerate(keyed) if k is not None}
  return [x for n, (k, args) in enumerate(keyed) if k is None or last[k] == n for x in args]


sys.argv[1:] = last_value_per_field(sys.argv[1:])


def _fail(msg: str, code: int = 2) -> None:
  """A usage error: one line on stderr, no traceback."""
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def _config_arg() -> str:
  return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")),
              "configs/facerec.py")


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


def _config_file_error(e: BaseException) -> str:
  """One line for a config file that does not load (syntax error, no get_config, raises)."""
  path = _config_arg()
  if isinstance(e, SyntaxError):
    where = f"line {e.lineno}: " if e.lineno else ""
    return (f"--config={path}: {where}{e.msg} (not a Python config file?); fix the file, which "
            "must define get_config(preset) returning a ConfigDict")
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return (f"--config={path}: the file defines no get_config(); define get_config(preset) "
            "returning a ml_collections.ConfigDict (see configs/facerec.py)")
  return (f"--config={path}: get_config() raised {type(e).__name__}: "
          f"{_first_line(e)}; fix the config file")


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if "get_config" in str(e):
      _fail(_config_file_error(e))
    _fail(_flag_error(e))
  except (flags.Error, OSError) as e:
    _fail(_flag_error(e))
  except Exception as e:  # the config file itself: SyntaxError, get_config() raising
    _fail(_config_file_error(e))


try:  # ml_collections applies --config.* overrides already here, at definition
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/facerec.py",
                                            "Config file, optionally :PRESET.", lock_config=True)
except (flags.Error, OSError, AttributeError, KeyError) as _e:
  _fail(_config_file_error(_e) if "get_config" in str(_e) else _flag_error(_e))
except Exception as _e:  # pylint: disable=broad-except
  _fail(_config_file_error(_e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the report go "
                               "(default: ./workdir/<task>_<preset>).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds another "
                               "config's run (the old one is moved to WORKDIR.old-<time>).")
_EVALUATE = flags.DEFINE_string("evaluate", None, "Only evaluate this model directory (a stage "
                                "dir or a converted checkpoint) and print its accuracy.")
_SIZES = flags.DEFINE_string("eval_sizes", "", "With --evaluate: comma-separated LR sizes "
                             "(empty: high resolution).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a failure, print the full traceback (it is "
                             "always written to WORKDIR/run.log).")


def setup(cfg) -> None:
  import jax
  if cfg.get("jax_cache_dir"):
    path = os.path.expanduser(cfg.jax_cache_dir)
    try:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    except OSError as e:
      raise UsageError(f"config.jax_cache_dir={cfg.jax_cache_dir!r} is not writable "
                       f"({e.strerror}); make it writable, point it elsewhere, or disable the "
                       "cache with --config.jax_cache_dir=") from None
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


class UsageError(ValueError):
  """A bad flag or flag value (exit status 2)."""


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


def guard_workdir(workdir: str, cfg, overwrite: bool, lock=None) -> None:
  """Refuse to mix two configs' runs in one workdir unless asked to start afresh (see
  askd_jax/workdir.py); writes config.json only after every check passed."""
  from askd_jax import workdir as workdir_lib
  workdir_lib.guard(workdir, cfg, overwrite, lock)


# Bump when the evaluation's numbers change for the same model and sets (2: the official
# flip-then-degrade order, native TinyFace, a deploy threshold and TAR@FAR per set).
EVAL_PROTOCOL = 2


def eval_fingerprint(cfg) -> str:
  """What an evaluation's numbers depend on besides the model: the evaluation sets and pairs
  (config.data, less where the files live and how fast they are read), the degradation
  (config.student) and config.eval."""
  import hashlib
  data = {k: v for k, v in cfg.get("data", {}).items()
          if k not in ("data_dir", "manual_dir", "workers")}
  student = {k: cfg.student.get(k) for k in ("mode", "blur", "sigma_range")} \
      if cfg.get("student") else {}
  blob = json.dumps({"protocol": EVAL_PROTOCOL, "data": data, "student": student,
                     "eval": dict(cfg.get("eval", {}))}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_stage(task, cfg, stage_dir: str, sizes_list) -> Dict[str, Any]:
  """Evaluate a model directory at each resolution; cached in STAGE/eval.json (when the
  directory is writable) under the `eval_fingerprint` of the config: a cache written by
  another evaluation protocol or for other sets is evaluated afresh."""
  import jax
  import jax.numpy as jnp
  from askd_jax.train import loop
  from askd_jax.train.checkpoint import load_model
  cache_path = os.path.join(stage_dir, "eval.json")
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      try:
        cache = json.load(f)
      except json.JSONDecodeError:
        cache = {}  # cut short by a crash: evaluate again
  fingerprint = eval_fingerprint(cfg)
  if cache and cache.get("_eval") != fingerprint:
    log.info("%s was written for another evaluation (protocol or sets); evaluating again",
             cache_path)
    cache = {}
  cache["_eval"] = fingerprint
  variables, spec = load_model(stage_dir)
  size = cfg.get("data", {}).get("image_size")
  if spec.get("input_size") and size and spec["input_size"] != size:
    raise UsageError(f"{stage_dir} holds a model for {spec['input_size']} px input, but "
                     f"config.data.image_size is {size}; pass "
                     f"--config.data.image_size={spec['input_size']} (or the config it was "
                     "trained with)")
  model = task.model(dtype=jnp.dtype(cfg.get("dtype", "float32")), spec=spec)
  out = {}
  for sizes in sizes_list:
    key = "HR" if not sizes else "/".join(map(str, sizes))
    if key not in cache:
      stop.at("evaluate", f"{os.path.basename(stage_dir.rstrip('/'))} {key}")
      t = time.time()
      with _stop_between_batches(task):
        res = task.evaluate(model, variables, tuple(sizes))
      # Timings go to events.jsonl only: eval.json and the results stay deterministic.
      loop.record(stage_dir, event="eval", resolution=key, seconds=time.time() - t,
                  sets={k: v.pop("seconds", None) for k, v in res.items()})
      cache[key] = res
    out[key] = cache[key]
  if jax.process_index() == 0:  # several hosts: one writer
    from askd_jax.workdir import write_json
    try:
      write_json(cache_path, cache)
    except OSError as e:  # a read-only model directory: the results are printed anyway
      log.warning("could not cache the results in %s (%s)", cache_path, e.strerror)
  return out


class _stop_between_batches:
  """Evaluation embeds batch after batch through `task.embed_fn`: a safe point before each."""

  def __init__(self, task):
    self.task = task

  def __enter__(self):
    make = getattr(self.task, "embed_fn", None)
    if make is None:
      return self

    def embed_fn(*a, **k):
      f = make(*a, **k)

      def checked(*args, **kw):
        stop.at("eval_batch", quiet=True)
        return f(*args, **kw)
      return checked
    self.task.embed_fn = embed_fn
    return self

  def __exit__(self, *exc):
    self.task.__dict__.pop("embed_fn", None)


def run(cfg, workdir: str, overwrite: bool = False) -> List[Dict[str, Any]]:
  """Train every stage (or resume), evaluate them, write the report; returns the rows.
  SIGTERM/SIGINT during the call raise `stop.Preempted` at the next safe point."""
  with stop.handling():
    try:
      return _run(cfg, workdir, overwrite)
    finally:  # in-process callers: the next run logs to its own workdir
      _log_close()


def _log_close() -> None:
  global _log_handler
  if _log_handler is not None:
    logging.getLogger().removeHandler(_log_handler)
    _log_handler.close()
    _log_handler = None


def _run(cfg, workdir: str, overwrite: bool) -> List[Dict[str, Any]]:
  import jax
  from askd_jax import config_check, report
  from askd_jax.tasks import get_task
  from askd_jax.train import loop
  from askd_jax.workdir import Lock
  t0 = time.time()
  stop.at("start")
  config_check.normalize(cfg)
  config_check.validate(cfg)
  is_main = jax.process_index() == 0
  lock = Lock(workdir) if is_main else None
  if lock is not None:
    _check_writable(workdir)
    took_over = lock.acquire()
    if took_over:
      print(took_over)
  try:
    if is_main:
      stop.at("guard")
      guard_workdir(workdir, cfg, overwrite, lock)
      _log_to(workdir)
      if took_over:
        log.info(took_over)
    stop.at("data")
    task = get_task(cfg)
    task.data  # prepares / reads the data set now, before any stage
    stages = plan_stages(cfg, workdir)
    writer_factory = _tensorboard(workdir)
    rows = []
    for stage in stages:
      stop.at("stage", stage.name)
      stage_dir = loop.train_stage(cfg, task, stage, workdir, writer_factory=writer_factory)
      if stage.kind == "teacher":
        evals = [()] + ([(s,) for s in cfg.student.sizes] if cfg.student.get("eval_teacher_lr")
                        else [])
      else:
        evals = [tuple(stage.sizes)]
      res = evaluate_stage(task, cfg, stage_dir, evals)
      for key, sets in res.items():
        for set_name, r in sets.items():
          rows.append({"stage": stage.name, "method": stage.method if stage.kind == "student"
                       else "teacher", "train_resolution": stage.resolution,
                       "eval_resolution": key, "set": set_name, **r})
    stop.at("report")
    if is_main:
      meta = {"preset": cfg.get("preset"), "task": cfg.get("task"), "elapsed_s": time.time() - t0,
              "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, "
                         f"{jax.devices()[0].platform} x{jax.device_count()}",
              "jax": jax.__version__, "caption": getattr(task, "report_caption", None)}
      stop.check("report")  # the last safe point: after it the results are complete
      png = os.path.join(workdir, "results.png")
      if os.path.exists(png):  # an old plot must not pass for this run's
        os.unlink(png)
      md = report.write_report(workdir, rows, meta)
      print("\n" + md)
      made = [f for f in ("results.md", "results.json", "results.png")
              if os.path.exists(os.path.join(workdir, f))]
      print(f"wrote {os.path.join(workdir, made[0])}, {', '.join(made[1:])}"
            + ("" if "results.png" in made else " (no results.png)"))
    return rows
  finally:
    if lock is not None:
      lock.release()


def _check_writable(workdir: str) -> None:
  """The workdir (or the folder it will be made in) must be writable, before any work."""
  d = os.path.abspath(workdir)
  while not os.path.exists(d):
    d = os.path.dirname(d)
  if not os.path.isdir(d) or not os.access(d, os.W_OK):
    raise OSError(errno.EACCES, "Permission denied (not a writable folder)", d)


_log_handler = None


def _log_to(workdir: str) -> None:
  """INFO and above (phase markers, warnings, full traces of failures) to WORKDIR/run.log."""
  global _log_handler
  root = logging.getLogger()
  _log_close()
  _log_handler = logging.FileHandler(os.path.join(workdir, LOG_FILE))
  _log_handler.setLevel(logging.INFO)
  _log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  # Libraries' INFO chatter (orbax logs every save at length) stays out; their warnings stay.
  _log_handler.addFilter(lambda r: r.name.startswith("askd_jax") or r.levelno >= logging.WARNING)
  root.addHandler(_log_handler)
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  log.info("command: %s", " ".join(sys.argv))


class MetricWriter:
  """The train loop's one metric writer: WORKDIR/<stage>/metrics.jsonl always (one JSON line
  per logged step; a resumed run appends, the last line of a step wins), and TensorBoard
  events under WORKDIR/tensorboard/<stage> where tensorboardX is installed."""

  def __init__(self, path: str, tensorboard=None):
    self.path, self.tb, self._rows = path, tensorboard, {}

  def add_scalar(self, tag: str, value, step: int) -> None:
    self._rows.setdefault(int(step), {})[tag.rsplit("/", 1)[-1]] = float(value)
    if self.tb is not None:
      self.tb.add_scalar(tag, value, step)

  def flush(self) -> None:
    if self._rows:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "a") as f:
        for step in sorted(self._rows):
          f.write(json.dumps({"step": step, **self._rows[step]}, sort_keys=True) + "\n")
      self._rows = {}
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    self.flush()
    if self.tb is not None:
      self.tb.close()


def _tensorboard(workdir):
  def factory(stage_name):
    try:
      from tensorboardX import SummaryWriter
      tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage_name))
    except ImportError:
      tb = None
    return MetricWriter(os.path.join(workdir, stage_name, "metrics.jsonl"), tb)
  return factory


def main(argv):
  del argv
  cfg = _CONFIG.value
  try:
    cfg.get("task")  # ml_collections defers a missing config file's error to first use
  except OSError as e:
    _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}; give an existing config "
          "file, e.g. --config=configs/facerec.py")
  workdir = _WORKDIR.value or os.path.join("workdir", f"{cfg.task}_{cfg.get('preset', 'run')}")
  for h in logging.getLogger().handlers:  # the terminal: warnings and errors (INFO: run.log)
    if h.level == logging.NOTSET:
      h.setLevel(logging.WARNING)
  try:
    with stop.handling():
      setup(cfg)
      if _EVALUATE.value:
        _evaluate_only(cfg)
      elif _SIZES.value:
        raise UsageError(f"--eval_sizes={_SIZES.value} only applies with --evaluate=MODEL_DIR; "
                         "a training run evaluates each student at config.student.sizes")
      elif cfg.get("grid") is not None:  # splits x seeds, one report (configs/facerec.py:compare)
        from askd_jax.compare import run_grid
        run_grid(cfg, workdir, _OVERWRITE.value, _run)
      else:
        _run(cfg, workdir, _OVERWRITE.value)  # keeps run.log open for the failure's trace
  except BaseException as e:  # the one place a failure becomes one line and an exit status
    _close_progress_bars()
    code, line = describe_failure(e, cfg, workdir)
    if code is None:
      raise
    if code == 0:
      print(line)
      sys.exit(0)
    trace = "".join(traceback.format_exception(e))
    if _log_handler is not None:  # the file only: the terminal gets the one line below
      _log_handler.handle(logging.LogRecord("askd_jax", logging.ERROR, __file__, 0, "%s\n%s",
                                            (line, trace), None))
    if code == 1 and not isinstance(e, KNOWN) and not isinstance(e, OSError):
      line += (f" (full trace in {os.path.join(workdir, LOG_FILE)})" if _log_handler is not None
               else " (--verbose prints the full trace)")
    if _VERBOSE.value:
      print(trace, file=sys.stderr, end="")
    _fail(line, code)


def _evaluate_only(cfg) -> None:
  from askd_jax.tasks import get_task
  from askd_jax.train.checkpoint import check_model_dir, read_spec
  try:
    sizes = tuple(int(s) for s in _SIZES.value.split(",") if s.strip())
  except ValueError:
    raise UsageError(f"--eval_sizes={_SIZES.value}: give comma-separated integer sizes in px, "
                     "e.g. --eval_sizes=7,14 (empty: high resolution)") from None
  path = _EVALUATE.value
  try:
    check_model_dir(path, "--evaluate=")
    read_spec(path)
  except (FileNotFoundError, ValueError) as e:
    msg = str(e)
    raise UsageError(f"--evaluate={msg}" if msg.startswith(path) else msg) from None
  res = evaluate_stage(get_task(cfg), cfg, path, [sizes])
  print(json.dumps(res, indent=2))


def _known():
  from askd_jax.config_check import ConfigError
  from askd_jax.train.loop import NonFiniteError, StageConfigError
  from askd_jax.train.state_io import CheckpointError
  from askd_jax.workdir import WorkdirError
  return (ConfigError, NonFiniteError, StageConfigError, CheckpointError, WorkdirError,
          UsageError)


KNOWN: tuple = ()


def describe_failure(e: BaseException, cfg, workdir: str):
  """(exit status, one line) for a failure; (None, None) for a non-error exit (SystemExit)."""
  global KNOWN
  from askd_jax.config_check import ConfigError
  KNOWN = _known()
  if isinstance(e, stop.Preempted):
    return 0, str(e)
  if isinstance(e, SystemExit):
    return None, None
  if isinstance(e, KeyboardInterrupt):  # SIGINT before the handlers were installed
    return 130, "SIGINT received before the run started; nothing was done"
  if isinstance(e, (ConfigError, UsageError)):
    return 2, _first_line(e)
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM,
                                            errno.EROFS, errno.EDQUOT):
    return 1, _os_error_line(e, cfg, workdir)
  if isinstance(e, KNOWN):
    return 1, _first_line(e)
  for code, hint in ((errno.ENOSPC, "No space left on device"),
                     (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
    if hint in str(e):  # wrapped by a library (orbax, tensorstore)
      return 1, _os_error_line(OSError(code, hint, _path_in(str(e))), cfg, workdir)
  if isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
    return 1, _first_line(e)
  return 1, f"{type(e).__name__}: {_first_line(e)}"


def _path_in(text: str):
  m = re.search(r"(/[^\s'\"]+)", text)
  return m.group(1).rstrip(":,;") if m else None


def _os_error_line(e: OSError, cfg, workdir: str) -> str:
  """'<flag naming the place> ... <path>: <reason>; <fix>' for a disk-full / permission error."""
  path = os.path.abspath(str(e.filename)) if e.filename else None
  places = [("--workdir", workdir)]
  data = cfg.get("data") if cfg is not None else None
  if data is not None and data.get("data_dir"):
    places.append(("config.data.data_dir", data.data_dir))
  if cfg is not None and cfg.get("jax_cache_dir"):
    places.append(("config.jax_cache_dir", cfg.jax_cache_dir))
  flag = None
  if path:
    for name, p in places:
      p = os.path.abspath(os.path.expanduser(p))
      if path == p or path.startswith(p.rstrip("/") + "/") or p.startswith(path.rstrip("/") + "/"):
        flag = f"{name}={p}"
        break
  where = f"{flag}: " if flag else ""
  what = f"cannot write {path}" if path else "cannot write"
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = ("free disk space (or move the run to a larger disk), then run the same command "
           "again to resume from the newest checkpoint")
  else:
    fix = "make it writable, or point the run at a writable folder"
  return f"{where}{what} ({e.strerror or os.strerror(e.errno)}); {fix}"


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
