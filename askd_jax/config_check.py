"""Config validation before any work starts: one line naming the field and the fix.

`validate(cfg)` runs before the workdir, the data or a compile is touched, so a typo costs
seconds, not a day of training. Every error is a `ConfigError` (a ValueError) whose message
is one line: `config.<field>=<value> ...; <what to do>`. The CLI prints it as
`error: ...` and exits with status 2. docs/reliability.md lists every case and its test.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Sequence

TASKS = ("facerec", "classification", "detection")
DTYPES = ("float32", "bfloat16", "float16")
EVAL_DTYPES = DTYPES + ("train",)  # train: config.dtype
FACE_DATA = ("orl", "insightface")
AUGMENTS = ("flip", "official", "demo", "none")
MARGINS = ("arcface", "cosface")
SCHEDULES = ("step", "cosine")
NAN_POLICIES = ("stop", "skip")
# Teacher spec fields a distilling student must share (attention maps are compared block by
# block, embeddings element by element).
ARCH_FIELDS = ("arch", "blocks", "width", "embedding_dim")


class ConfigError(ValueError):
  pass


def _fail(msg: str) -> None:
  raise ConfigError(msg)


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _choice(field: str, value, options: Sequence[str]) -> None:
  if value not in options:
    _fail(f"config.{field}={value!r} is unknown; use one of {', '.join(options)}")


def _positive(field: str, value, *, integer=False, zero_ok=False) -> None:
  ok = (_int(value) if integer else _num(value)) and (value >= 0 if zero_ok else value > 0)
  if not ok:
    kind = "an integer" if integer else "a number"
    _fail(f"config.{field}={value!r} must be {kind} {'>= 0' if zero_ok else '> 0'}")


def normalize(cfg) -> None:
  """Accept `--config.student.methods=none,askd` and `--config.student.sizes=7,14` spelled
  as one string (ml_collections keeps 'a,b' as a one-element tuple of that string)."""
  st = cfg.get("student")
  if st is None:
    return
  with cfg.unlocked() if hasattr(cfg, "unlocked") else _Null():
    for field, cast in (("methods", str), ("sizes", int)):
      vals = st.get(field)
      if isinstance(vals, (str, int)):
        vals = (vals,)
      if vals is None:
        continue
      out = []
      for v in vals:
        for part in (v.split(",") if isinstance(v, str) else [v]):
          part = part.strip() if isinstance(part, str) else part
          if part == "":
            continue
          if cast is int and isinstance(part, str) and part.lstrip("-").isdigit():
            part = int(part)
          out.append(part)
      if tuple(out) != tuple(vals):  # leave untouched fields (and FieldReferences) alone
        st[field] = tuple(out)
    data = cfg.get("data")
    for field in ("verification", "ijb"):
      ver = data.get(field) if data is not None else None
      if ver is not None:
        vals = (ver,) if isinstance(ver, str) else tuple(ver)
        out = tuple(p.strip() for v in vals for p in str(v).split(",") if p.strip())
        if out != vals:
          data[field] = out


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def validate(cfg) -> None:
  """Raise ConfigError (one line: field, value, fix) for the first bad field."""
  task = cfg.get("task", "facerec")
  _choice("task", task, TASKS)
  if importlib.util.find_spec(f"askd_jax.tasks.{task}") is None:
    _fail(f"config.task={task!r} is not available in this installation "
          f"(askd_jax/tasks/{task}.py is missing); use facerec")
  _choice("dtype", cfg.get("dtype", "float32"), DTYPES)
  if not _int(cfg.get("seed", 0)):
    _fail(f"config.seed={cfg.get('seed')!r} must be an integer")
  _positive("shard_params_min_size", cfg.get("shard_params_min_size", 0), integer=True,
            zero_ok=True)
  if cfg.get("data") is not None:
    _positive("data.prefetch", cfg.data.get("prefetch", 2), integer=True)
  if task == "facerec":
    _check_face_data(cfg.data)
    _check_face_model(cfg.model)
  _check_train(cfg.train)
  if cfg.get("student") is not None:
    _check_student(cfg, task)
  ev = cfg.get("eval")
  if ev is not None and "batch_size" in ev:
    _positive("eval.batch_size", ev.batch_size, integer=True)
  if ev is not None:
    _choice("eval.dtype", ev.get("dtype", "float32"), EVAL_DTYPES)
  _check_devices(cfg.train)  # last: it starts the JAX backend


def _check_face_data(d) -> None:
  name = d.get("name", "orl")
  _choice("data.name", name, FACE_DATA)
  size = d.image_size
  if not _int(size) or not 8 <= size <= 112:
    _fail(f"config.data.image_size={size!r} must be an integer in [8, 112] (face crops are "
          "112 x 112; smaller sizes resample them)")
  _choice("data.augment", d.get("augment", "flip"), AUGMENTS)
  _positive("data.workers", d.get("workers", 0), integer=True, zero_ok=True)
  if name == "orl":
    n = d.get("num_pairs", 600)
    if not _int(n) or n <= 0 or n % 20:
      _fail(f"config.data.num_pairs={n!r} must be a positive multiple of 20 (10 folds of "
            "positive and negative pairs); use 600")
  for field in ("manual_dir",) + (("data_dir",) if name != "orl" else ()):
    path = d.get(field, "")
    if path and not os.path.isdir(os.path.expanduser(path)):
      _fail(f"config.data.{field}={path!r} does not exist; point it at the folder holding "
            "the data set's files (see docs/datasets.md)")
  if name != "orl" and not d.get("manual_dir") and not d.get("data_dir"):
    _fail(f"config.data.manual_dir is empty but data.name={name!r} reads your files; set "
          "--config.data.manual_dir=<folder> (or data.data_dir to a prepared tfds folder)")


def _check_face_model(m) -> None:
  from askd_jax.models.iresnet import STAGE_SIZES
  stages = tuple(m.get("stage_sizes") or ())
  if stages:
    if len(stages) != 4 or not all(_int(s) and s > 0 for s in stages):
      _fail(f"config.model.stage_sizes={stages!r} must be 4 positive integers, e.g. (1, 1, 1, 1)"
            ", or () to use model.depth")
  elif m.depth not in STAGE_SIZES:
    _fail(f"config.model.depth={m.depth!r} is not an iResNet depth; use one of "
          f"{', '.join(map(str, sorted(STAGE_SIZES)))} or set model.stage_sizes")
  _positive("model.width", m.width)
  _positive("model.embedding_dim", m.embedding_dim, integer=True)
  dr = m.get("dropout", 0.0)
  if not _num(dr) or not 0 <= dr < 1:
    _fail(f"config.model.dropout={dr!r} must be in [0, 1)")
  _choice("model.margin", m.get("margin", "arcface"), MARGINS)
  _positive("model.s", m.get("s", 32.0))
  _positive("model.m", m.get("m", 0.5), zero_ok=True)


def _check_train(t) -> None:
  lr = t.lr
  if not _num(lr) or lr <= 0:
    _fail(f"config.train.lr={lr!r} must be a finite number > 0 (the paper uses 0.1)")
  _choice("train.nan_policy", t.get("nan_policy", "stop"), NAN_POLICIES)
  _choice("train.schedule", t.get("schedule", "step"), SCHEDULES)
  steps = t.get("steps", 0)
  _positive("train.steps", steps, integer=True, zero_ok=True)
  if not steps and (not _num(t.epochs) or t.epochs <= 0):
    _fail(f"config.train.epochs={t.epochs!r} must be > 0 (or set config.train.steps)")
  for field in ("weight_decay", "warmup_epochs"):
    _positive(f"train.{field}", t.get(field, 0.0), zero_ok=True)
  mom = t.get("momentum", 0.9)
  if not _num(mom) or not 0 <= mom < 1:
    _fail(f"config.train.momentum={mom!r} must be in [0, 1)")
  fac = t.get("lr_factor", 0.1)
  if not _num(fac) or not 0 < fac <= 1:
    _fail(f"config.train.lr_factor={fac!r} must be in (0, 1]")
  b = tuple(t.get("lr_boundaries", ()) or ())
  if any(not _num(x) or x <= 0 for x in b) or list(b) != sorted(b):
    _fail(f"config.train.lr_boundaries={b!r} must be increasing epochs > 0, e.g. (6, 11, 15, 17)")
  _positive("train.log_every", t.get("log_every", 10), integer=True)
  _positive("train.checkpoint_every", t.get("checkpoint_every", 0), integer=True, zero_ok=True)
  _positive("train.keep", t.get("keep", 2), integer=True)
  _positive("train.max_bad_steps", t.get("max_bad_steps", 100), integer=True, zero_ok=True)
  if not _int(t.batch_size) or t.batch_size <= 0:
    _fail(f"config.train.batch_size={t.batch_size!r} must be a positive integer")


def _check_devices(t) -> None:
  import jax
  n = jax.device_count()
  if t.batch_size % n:
    fix = max(n, t.batch_size // n * n)
    _fail(f"config.train.batch_size={t.batch_size} is not divisible by the {n} devices; use a "
          f"multiple of {n}, e.g. {fix}")


def _check_student(cfg, task: str) -> None:
  from askd_jax import distill
  from askd_jax.data import degrade
  st = cfg.student
  methods = tuple(st.methods)
  if not methods:
    _fail("config.student.methods is empty; give at least one of "
          f"{', '.join(sorted(distill.REGISTRY))}")
  for m in methods:
    if m not in distill.REGISTRY:
      _fail(f"config.student.methods has {m!r}, an unknown distillation method; choose from "
            f"{', '.join(sorted(distill.REGISTRY))} (several: --config.student.methods=none,askd)")
  size = cfg.data.image_size
  for s in st.sizes:
    if not _int(s) or s <= 0 or s > size:
      _fail(f"config.student.sizes has {s!r}, but sizes must be integers in "
            f"[1, data.image_size={size}]; lower it or raise data.image_size")
  _choice("student.mode", st.get("mode", "official"), degrade.MODES)
  _choice("student.blur", st.get("blur", "official"), degrade.BLURS)
  sr = tuple(st.get("sigma_range", (0.1, 2.0)))
  if len(sr) != 2 or not all(_num(x) and x > 0 for x in sr) or sr[0] > sr[1]:
    _fail(f"config.student.sigma_range={sr!r} must be (low, high) with 0 < low <= high")
  for m in methods:
    if m != "none":
      w = cfg.distill.get(m, {}).get("weight", 1.0)
      if not _num(w) or w < 0:
        _fail(f"config.distill.{m}.weight={w!r} must be a number >= 0")
  if st.get("teacher"):
    check_teacher(cfg, st.teacher, distilling=any(m != "none" for m in methods))


def _blocks(spec) -> Any:
  from askd_jax.models.iresnet import STAGE_SIZES
  s = spec.get("stage_sizes")
  return tuple(s) if s else STAGE_SIZES.get(spec.get("depth"), spec.get("depth"))


def check_teacher(cfg, path: str, distilling: bool = True) -> None:
  """The teacher model directory exists, its model.json reads, and it is the architecture
  (task, input size, and for distillation the blocks, width and embedding) the student needs."""
  from askd_jax.train.checkpoint import read_spec
  if os.path.isfile(path):
    _fail(f"config.student.teacher={path!r} is a file, not a model directory; convert a "
          "PyTorch checkpoint first (python -m askd_jax.tools.convert --net=FILE --out=DIR) "
          "and give DIR")
  if not os.path.isdir(path):
    _fail(f"config.student.teacher={path!r} does not exist; give a trained teacher stage "
          "directory (WORKDIR/teacher) or a converted checkpoint (askd_jax.tools.convert)")
  try:
    tspec = read_spec(path)
  except (FileNotFoundError, ValueError) as e:
    _fail(f"config.student.teacher={path!r}: {str(e).splitlines()[0]}")
  if not isinstance(tspec, dict):
    _fail(f"config.student.teacher={path!r}: model.json holds a {type(tspec).__name__}, not "
          "a model spec; re-export the teacher")
  if tspec.get("kind") == "student":
    _fail(f"config.student.teacher={path!r} is a student ({tspec.get('method')}, "
          f"{'/'.join(map(str, tspec.get('sizes') or []))} px), not a teacher; point it at a "
          "high-resolution teacher (WORKDIR/teacher or a converted checkpoint)")
  m = cfg.model
  mine = {"task": cfg.get("task", "facerec"), "input_size": cfg.data.image_size,
          "arch": "iresnet_cbam", "blocks": _blocks({"stage_sizes": m.get("stage_sizes"),
                                                     "depth": m.get("depth")}),
          "width": m.get("width"), "embedding_dim": m.get("embedding_dim")}
  theirs = dict(tspec, blocks=_blocks(tspec))
  fields = ("task", "input_size") + (ARCH_FIELDS if distilling and mine["task"] == "facerec"
                                     else ())
  names = {"input_size": "data.image_size", "blocks": "model.depth/model.stage_sizes",
           "width": "model.width", "embedding_dim": "model.embedding_dim", "arch": "model",
           "task": "task"}
  for k in fields:
    if k in theirs and theirs[k] != mine[k]:
      _fail(f"config.student.teacher={path!r} has {k}={theirs[k]!r} but this run's "
            f"config.{names[k]} gives {mine[k]!r}; set config.{names[k]} to match the teacher "
            "or point student.teacher at a matching checkpoint")
