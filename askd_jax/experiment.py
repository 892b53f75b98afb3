"""The run behind `python -m askd_jax.main`, as functions that notebooks and tests call in
process: `run` trains every stage (teacher, students; finished ones are skipped, an
unfinished one resumes), evaluates them and writes the report; `evaluate` scores one model
directory. askd_jax/main.py only parses the flags, calls these and turns a failure into one
line and an exit status (askd_jax/failures.py).

    from askd_jax import experiment
    cfg = experiment.load_config("configs/facerec.py", ["--config.train.epochs=5"])
    experiment.setup(cfg)                       # once, before anything touches JAX
    rows = experiment.run(cfg, "workdir/demo")  # the rows of WORKDIR/results.json
"""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List, Sequence

from askd_jax import stop
from askd_jax.failures import UsageError, describe_failure

LOG_FILE = "run.log"
log = logging.getLogger("askd_jax")


def last_value_per_field(argv: Sequence[str]) -> List[str]:
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


def load_config(config: str, overrides: Sequence[str] = ()):
  """The ConfigDict that `python -m askd_jax.main --config=CONFIG OVERRIDES...` runs:
  `config` is "configs/facerec.py" or "configs/facerec.py:casia" (a leading "--config=" is
  accepted), `overrides` are `--config.FIELD=VALUE` arguments, parsed by ml_collections'
  config flag exactly as main.py parses them (the last value of a field wins)."""
  from absl import flags
  from ml_collections import config_flags
  config = config.removeprefix("--config=")
  argv = last_value_per_field(list(overrides))
  for i, a in enumerate(argv):
    value = i and argv[i - 1].startswith("--config.") and "=" not in argv[i - 1]
    if not (a.startswith("--config.") or value):
      raise UsageError(f"{a}: load_config takes --config.FIELD=VALUE overrides only")
  argv = ["load_config", f"--config={config}", *argv]
  fv = flags.FlagValues()
  with warnings.catch_warnings():  # ml_collections loads the file with importlib's load_module
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    holder = config_flags.DEFINE_config_file("config", config, flag_values=fv, lock_config=True,
                                             sys_argv=argv)
    fv(argv)
    return holder.value


def setup(cfg) -> None:
  """Process-wide settings from the config, once, before anything touches JAX: the XLA
  compilation cache, `runtime.tune_cpu`, multi-host initialisation, quieter libraries."""
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
# flip-then-degrade order, native TinyFace, a deploy threshold and TAR@FAR per set; 3: float32
# whatever the training dtype, one size at a time).
EVAL_PROTOCOL = 3


def eval_fingerprint(cfg) -> str:
  """What an evaluation's numbers depend on besides the model, the data's content and the
  dtype: the evaluation sets and pairs (config.data, less where the files live and how fast
  they are read), the degradation (config.student) and config.eval (less its dtype)."""
  import hashlib
  data = {k: v for k, v in cfg.get("data", {}).items()
          if k not in ("data_dir", "manual_dir", "workers")}
  student = {k: cfg.student.get(k) for k in ("mode", "blur", "sigma_range")} \
      if cfg.get("student") else {}
  ev = {k: v for k, v in cfg.get("eval", {}).items() if k != "dtype"}
  blob = json.dumps({"protocol": EVAL_PROTOCOL, "data": data, "student": student,
                     "eval": ev}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def eval_dtype(cfg) -> str:
  """The dtype evaluation computes in: config.eval.dtype, float32 unless asked ("train":
  config.dtype, the training compute dtype), as the official evaluation runs in float32."""
  from askd_jax.config_check import EVAL_DTYPES
  d = cfg.get("eval", {}).get("dtype") or "float32"
  if d not in EVAL_DTYPES:  # --evaluate does not run config_check.validate
    raise UsageError(f"config.eval.dtype={d!r} is unknown; use one of {', '.join(EVAL_DTYPES)}")
  return str(cfg.get("dtype") or "float32") if d == "train" else str(d)


def one_size_each(sizes_list) -> List[tuple]:
  """[(), (14, 28)] -> [(), (14,), (28,)]: each size is evaluated on its own (the official
  evaluates one resolution at a time); () or 0 is high resolution."""
  out = []
  for sizes in sizes_list:
    for s in (tuple(sizes) or (0,)):
      r = (int(s),) if int(s) else ()
      if r not in out:
        out.append(r)
  return out


def evaluate_stage(task, cfg, stage_dir: str, sizes_list) -> Dict[str, Any]:
  """Evaluate a model directory at each resolution, one size at a time, in `eval_dtype`;
  cached in STAGE/eval.json (askd_jax/evalfile.py, when the directory is writable) under the
  weights evaluated (parameters and BatchNorm statistics), the `eval_fingerprint` of the
  config, the identity of the prepared data (`task.eval_data_identity`) and the dtype. Other
  evaluations of the same weights are kept beside it."""
  import jax
  import jax.numpy as jnp
  from askd_jax import evalfile
  from askd_jax.train import loop
  from askd_jax.train.checkpoint import load_model
  cache_path = os.path.join(stage_dir, evalfile.FILE)
  variables, spec = load_model(stage_dir)
  size = cfg.get("data", {}).get("image_size")
  if spec.get("input_size") and size and spec["input_size"] != size:
    raise UsageError(f"{stage_dir} holds a model for {spec['input_size']} px input, but "
                     f"config.data.image_size is {size}; pass "
                     f"--config.data.image_size={spec['input_size']} (or the config it was "
                     "trained with)")
  dtype = eval_dtype(cfg)
  data_id = task.eval_data_identity()
  fingerprint = eval_fingerprint(cfg)
  doc = evalfile.read(cache_path, evalfile.weights_hash(variables))
  entry = evalfile.entry(doc, f"{fingerprint}-{data_id}-{dtype}", config=fingerprint,
                         data=data_id, dtype=dtype, preset=cfg.get("preset"))
  cache = entry["results"]
  model = task.model(dtype=jnp.dtype(dtype), spec=spec)
  out = {}
  for sizes in one_size_each(sizes_list):
    key = "HR" if not sizes else str(sizes[0])
    if key not in cache:
      stop.at("evaluate", f"{os.path.basename(stage_dir.rstrip('/'))} {key}")
      t = time.time()
      with _stop_between_batches(task, f"{os.path.basename(stage_dir.rstrip('/'))} {key}"):
        res = task.evaluate(model, variables, sizes)
      # Timings go to events.jsonl only: eval.json and the results stay deterministic.
      loop.record(stage_dir, event="eval", resolution=key, seconds=time.time() - t,
                  sets={k: v.pop("seconds", None) for k, v in res.items()})
      cache[key] = res
    out[key] = cache[key]
  if jax.process_index() == 0:  # several hosts: one writer
    from askd_jax.workdir import write_json
    try:
      write_json(cache_path, doc)
    except OSError as e:  # a read-only model directory: the results are printed anyway
      log.warning("could not cache the results in %s (%s)", cache_path, e.strerror)
  return out


class _stop_between_batches:
  """Evaluation embeds batch after batch through `task.embed_fn`: a safe point before each."""

  def __init__(self, task, what: str = ""):
    self.task, self.what = task, what  # named in the stop message: "teacher HR"

  def __enter__(self):
    make = getattr(self.task, "embed_fn", None)
    if make is None:
      return self

    def embed_fn(*a, **k):
      f = make(*a, **k)

      def checked(*args, **kw):
        stop.at("eval_batch", self.what, quiet=True)
        return f(*args, **kw)
      return checked
    self.task.embed_fn = embed_fn
    return self

  def __exit__(self, *exc):
    self.task.__dict__.pop("embed_fn", None)


def evaluate(cfg, model_dir: str, sizes: Sequence[int] = ()) -> Dict[str, Any]:
  """Evaluate one model directory (a stage directory or a converted checkpoint) at high
  resolution (sizes ()) or at each of `sizes` separately ((7, 14): 7 px, then 14 px);
  {resolution: {set: results}}, cached in MODEL_DIR/eval.json like a run's."""
  from askd_jax.tasks import get_task
  return evaluate_stage(get_task(cfg), cfg, model_dir, [tuple(sizes)])


def run(cfg, workdir: str, overwrite: bool = False) -> List[Dict[str, Any]]:
  """Train every stage (or resume), evaluate them, write the report; returns the rows of
  WORKDIR/results.json. `overwrite`: start afresh in a workdir that holds another config's
  run (the old one is moved aside). SIGTERM/SIGINT during the call raise `stop.Preempted` at
  the next safe point. Once the workdir is checked, INFO and above go to WORKDIR/run.log; a
  failure's line (`failures.describe_failure`) and full trace too, and the exception then
  carries that file's path as `run_log`."""
  with stop.handling():
    try:
      return _run(cfg, workdir, overwrite)
    except BaseException as e:
      _log_failure(e, cfg, workdir)
      raise
    finally:  # in-process callers: the next run logs to its own workdir
      _log_close()


def _log_failure(e: BaseException, cfg, workdir: str) -> None:
  """The failure's one line and full trace to run.log only (the terminal gets the line from
  the caller: askd_jax/main.py prints it)."""
  if _log_handler is None:
    return
  code, line = describe_failure(e, cfg, workdir)
  if code is None or code == 0:  # a non-error exit, or stopped by a signal
    return
  trace = "".join(traceback.format_exception(e))
  _log_handler.handle(logging.LogRecord("askd_jax", logging.ERROR, __file__, 0, "%s\n%s",
                                        (line, trace), None))
  e.run_log = os.path.join(workdir, LOG_FILE)


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
    writer_factory = _metric_writers(workdir)
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


def _metric_writers(workdir):
  """stage name -> its MetricWriter (the train loop makes one per stage)."""
  def factory(stage_name):
    try:
      from tensorboardX import SummaryWriter
      tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage_name))
    except ImportError:
      tb = None
    return MetricWriter(os.path.join(workdir, stage_name, "metrics.jsonl"), tb)
  return factory
