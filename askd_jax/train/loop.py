"""One train loop for every task and stage: read it top to bottom.

A stage is the teacher (high resolution, no distillation) or a student (low resolution,
a frozen teacher, one distillation method). Re-running the same command skips finished
stages and resumes an unfinished one from its newest checkpoint, bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from askd_jax import distill as distill_lib
from askd_jax import ops
from askd_jax import stop
from askd_jax.data import degrade as degrade_lib
from askd_jax.data import pipeline
from askd_jax.train import checkpoint as ckpt_lib
from askd_jax.train import sharding as shd
from askd_jax.train import state_io
from askd_jax.train.optim import sgd_torch, step_schedule, cosine_schedule
from askd_jax.train.step import init_state, make_train_step

log = logging.getLogger(__name__)
DONE = "DONE"


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str                      # directory name under the workdir
  kind: str                      # 'teacher' | 'student'
  method: str = "none"           # distillation method (students)
  sizes: Sequence[int] = ()      # low-resolution sizes a student sees (one drawn per sample)
  teacher: Optional[str] = None  # teacher model directory (students)

  @property
  def resolution(self) -> str:
    return "HR" if self.kind == "teacher" else "/".join(str(s) for s in self.sizes)


Preempted = stop.Preempted  # SIGTERM/SIGINT honoured; re-running the command resumes


class NonFiniteError(RuntimeError):
  pass


class StageConfigError(ValueError):
  """A stage directory holds a model trained with another config."""


def stage_done(workdir: str, stage: Stage) -> bool:
  """DONE and model.json both there. DONE without model.json (deleted) is not finished: the
  stage restores its final step, trains no further and writes model.json again."""
  d = os.path.join(workdir, stage.name)
  return os.path.exists(os.path.join(d, DONE)) and os.path.exists(os.path.join(d, ckpt_lib.SPEC_FILE))


def stage_config_hash(stage_dir: str, key: str = "config_hash"):
  """(config hash the stage was trained with, the file that says so), or (None, None) when
  the directory holds no stage (or one written before the hash was stored). key="config":
  the `hashed_config` it was trained with, where recorded."""
  spec_path = os.path.join(stage_dir, ckpt_lib.SPEC_FILE)
  if os.path.exists(os.path.join(stage_dir, DONE)) and os.path.exists(spec_path):
    try:
      with open(spec_path) as f:
        return json.load(f).get(key), spec_path
    except (OSError, ValueError, AttributeError):
      return None, None
  return state_io.newest_meta_value(os.path.join(stage_dir, "checkpoints"), key)


def check_stage_config(stage_dir: str, want: Sequence[str],
                       config: Optional[Dict[str, Any]] = None) -> None:
  """Refuse a stage (finished or not) that was trained with another config than `want`
  (`cfg_hashes`; `config`: this run's `hashed_config`, to name the fields that differ)."""
  want = (want,) if isinstance(want, str) else tuple(want)
  got, where = stage_config_hash(stage_dir)
  if got is not None and got not in want:
    changed = config_changes(stage_config_hash(stage_dir, "config")[0], config or {})
    what = f"changed: {changed}" if changed else f"hash {got}, this run's is {want[0]}"
    raise StageConfigError(
        f"{stage_dir} was trained with another config ({what}; recorded in {where}); run it "
        "with the config it was trained with, or use another --workdir (or --overwrite to "
        "move the old run aside)")


def check_stage_data(stage_dir: str, data: Optional[Dict[str, str]]) -> None:
  """Refuse a stage (finished or not) that was trained on other data than `data`
  (`Task.data_record`: the prepared training data's folder and content hash). The same
  content anywhere (a copy) is the same data; so is the folder the stage was trained from,
  whatever it holds now (a set prepared again there serialises its records in another order:
  a warning). Stages that recorded no data, and in-memory data, are not checked."""
  if not data:
    return
  was, where = stage_config_hash(stage_dir, "train_data")
  if not isinstance(was, dict) or was.get("identity") == data["identity"]:
    return
  if was.get("dir") == data["dir"]:
    log.warning("%s: the data in %s changed since the stage was trained (content hash %s, "
                "now %s); going on with it", os.path.basename(stage_dir), data["dir"],
                was.get("identity"), data["identity"])
    return
  raise StageConfigError(
      f"{stage_dir} was trained on other data: {was.get('dir')} (content hash "
      f"{was.get('identity')}; recorded in {where}), but this run reads {data['dir']} (content "
      f"hash {data['identity']}); point config.data.data_dir at the data it was trained on (or "
      "a copy of it), or use another --workdir")


def _schedule(tcfg, steps_per_epoch, total_steps):
  if tcfg.get("schedule", "step") == "cosine":
    return cosine_schedule(tcfg.lr, total_steps, int(tcfg.get("warmup_epochs", 0) * steps_per_epoch))
  bounds = [e * total_steps / (tcfg.epochs * steps_per_epoch) for e in tcfg.lr_boundaries]
  return step_schedule(tcfg.lr, steps_per_epoch, bounds, tcfg.get("lr_factor", 0.1),
                       tcfg.get("warmup_epochs", 0.0))


def train_stage(cfg, task, stage: Stage, workdir: str, *, mesh=None, progress=True,
                writer_factory=None) -> str:
  """Train one stage to completion (or resume it). Returns the stage directory. A SIGTERM /
  SIGINT finishes the step, saves it and raises Preempted (see askd_jax/stop.py)."""
  with stop.handling():
    return _train_stage(cfg, task, stage, workdir, mesh=mesh, progress=progress,
                        writer_factory=writer_factory)


def _train_stage(cfg, task, stage: Stage, workdir: str, *, mesh, progress, writer_factory) -> str:
  stage_dir = os.path.join(workdir, stage.name)
  check_stage_config(stage_dir, cfg_hashes(cfg), hashed_config(cfg))
  check_stage_data(stage_dir, task.data_record())
  if stage_done(workdir, stage):
    log.info("stage %s already finished; skipping", stage.name)
    return stage_dir
  b = build(cfg, task, stage, stage_dir, mesh or shd.make_mesh())
  state, data_state = init_or_restore(b, task)
  stop.at("compile", stage.name)  # the first step compiles
  it = open_input(b, task, state, data_state)
  is_main = jax.process_index() == 0
  writer = writer_factory(stage.name) if (writer_factory and is_main) else None
  bar = _progress(progress and is_main, stage.name, b.total_steps, int(state.step))
  clock = Clock(b.batch_size, int(state.step))
  check = lambda state: _check_finite(state, b.nan_policy, b.max_bad_steps, stage)
  save = _saver(b, it, check, clock)
  actions = side_tasks(b, writer=writer, bar=bar, save=save, check=check, clock=clock)
  try:
    state = run_loop(b, state, it, actions, clock)
  finally:  # stopped or failed too: the loader's worker processes end here
    it.close()
  finish(b, task, state, clock, save)
  if bar is not None:
    bar.close()
  if writer is not None:
    writer.close()
  return stage_dir


# --- build: the optimizer, the teacher, the step; nothing runs yet ----------------------------

@dataclasses.dataclass
class Built:
  """One stage ready to run: what `build` makes and the later phases read."""
  stage: Stage
  stage_dir: str
  mesh: Any
  batch_size: int            # global
  total_steps: int
  meta: Dict[str, Any]       # saved with every checkpoint: stage, config hash, teacher
  init_fn: Callable          # key -> a fresh TrainState
  init_key: Any
  state_sh: Any              # the state's shardings
  mgr: Any                   # the checkpoint manager
  jstep: Callable            # jitted step(state, teacher_vars, batch) -> (state, metrics)
  teacher_vars: Any          # the frozen teacher's variables on the mesh (students), or None
  seed: int
  prefetch: int              # batches on device ahead of the step
  log_every: int
  checkpoint_every: int
  nan_policy: str
  max_bad_steps: int


def build(cfg, task, stage: Stage, stage_dir: str, mesh) -> Built:
  """Schedule, optimizer, model, the frozen teacher (students), the state's shardings, the
  checkpoint manager and the jitted step (compiled by its first call)."""
  stop.at("build", stage.name)
  tcfg = cfg.train
  n_dev = mesh.devices.size
  gbatch = tcfg.batch_size
  if gbatch % n_dev:
    raise ValueError(f"train.batch_size={gbatch} is not divisible by the {n_dev} devices; "
                     f"use a multiple of {n_dev}")
  steps_per_epoch = max(task.num_train_examples // gbatch, 1)
  total_steps = tcfg.get("steps", 0) or int(round(tcfg.epochs * steps_per_epoch))
  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  platform = mesh.devices.flat[0].platform  # the one backend choice: models, step, compiler
  model = task.model(dtype=dtype, platform=platform)
  tx = sgd_torch(_schedule(tcfg, steps_per_epoch, total_steps), tcfg.momentum,
                 tcfg.weight_decay, tcfg.get("nesterov", True))

  # The frozen teacher (students only).
  teacher_model = teacher_vars = None
  meta = {"stage": stage.name, "config_hash": cfg_hash(cfg), "config": hashed_config(cfg),
          "train_data": task.data_record()}
  if stage.kind == "student":
    teacher_vars, tspec = ckpt_lib.load_model(stage.teacher)
    task.check_teacher(tspec, stage.teacher)
    teacher_model = task.model(dtype=dtype, spec=tspec, platform=platform)
    meta["teacher"] = {"path": os.path.abspath(stage.teacher),
                       "params_hash": ckpt_lib.params_hash(teacher_vars["params"])}
    teacher_vars = jax.device_put(teacher_vars, shd.replicated(mesh))

  seed = cfg.get("seed", 0)
  init_key = jax.random.fold_in(jax.random.key(seed), _stage_salt(stage.name))

  def init_fn(key):
    k_param, k_drop, k_state = jax.random.split(key, 3)
    sample = task.sample_batch(2)
    variables = model.init({"params": k_param, "dropout": k_drop},
                           task.preprocess(sample), sample.get("label"), train=True)
    return init_state(variables["params"], variables.get("batch_stats", {}), tx, k_state)

  state_sh = shd.state_shardings(jax.eval_shape(init_fn, init_key), mesh,
                                 cfg.get("shard_params_min_size", 0))
  mgr = state_io.manager(os.path.join(stage_dir, "checkpoints"), keep=tcfg.get("keep", 2))

  degrade_fn = (degrade_lib.make_degrade(student_degrade_cfg(cfg.student, stage.sizes))
                if stage.kind == "student" else None)
  dname = stage.method if stage.kind == "student" else "none"
  distill_fn = distill_lib.get(dname) if dname != "none" else None
  dcfg = cfg.distill.get(dname, {}) if distill_fn else None
  step_fn = make_train_step(task=task, model=model, tx=tx, cpu_ops=ops.on_cpu(platform),
                            teacher_model=teacher_model, distill_fn=distill_fn,
                            distill_cfg=dcfg, degrade_fn=degrade_fn)
  jstep = shd.jit_train_step(step_fn, mesh, state_sh)  # batch split on 'data', state as state_sh
  return Built(stage=stage, stage_dir=stage_dir, mesh=mesh, batch_size=gbatch,
               total_steps=total_steps, meta=meta, init_fn=init_fn, init_key=init_key,
               state_sh=state_sh, mgr=mgr, jstep=jstep, teacher_vars=teacher_vars, seed=seed,
               prefetch=cfg.data.get("prefetch", 2), log_every=tcfg.get("log_every", 10),
               checkpoint_every=tcfg.get("checkpoint_every", 0),
               nan_policy=tcfg.get("nan_policy", "stop"),
               max_bad_steps=tcfg.get("max_bad_steps", 100))


# --- init_or_restore: a fresh state, or the newest checkpoint and its input position ----------

def init_or_restore(b: Built, task):
  """(state, the saved input position or None). A resumed student must have been trained
  against the teacher it now loads."""
  stage = b.stage
  abstract = jax.eval_shape(b.init_fn, b.init_key)
  restored = state_io.restore_latest(
      b.mgr, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, b.state_sh))
  if restored is None:
    state = jax.jit(b.init_fn, out_shardings=b.state_sh)(b.init_key)
    pretrained = task.pretrained_variables()
    if pretrained:
      state = with_pretrained(state, pretrained, b.state_sh)
      log.info("%s: started from pretrained %s", stage.name,
               ", ".join(f"{c}/{k}" for c, t in pretrained.items() for k in t))
    return state, None
  step0, state, data_state, old_meta = restored
  # The teacher's parameters must be the ones this student was trained against; a moved
  # workdir (same parameters, another path) is fine.
  was, now = old_meta.get("teacher") or {}, b.meta.get("teacher") or {}
  if was.get("params_hash") != now.get("params_hash"):
    raise ValueError(
        f"{b.stage_dir}: this student was trained up to step {step0} against teacher "
        f"{was.get('path')} (params hash {was.get('params_hash')}), but student.teacher "
        f"now loads {now.get('path')} (params hash {now.get('params_hash')}); restore that "
        "teacher, or use a new --workdir to train the student again")
  if was.get("path") != now.get("path"):
    log.warning("%s: the teacher moved from %s to %s (same parameters)", stage.name,
                was.get("path"), now.get("path"))
  log.info("resuming %s from step %d", stage.name, step0)
  return state, data_state


def open_input(b: Built, task, state, data_state) -> pipeline.DevicePrefetchIterator:
  """The training batches as global device arrays, `b.prefetch` ahead, from the saved
  position when resuming. Its `get_state()` is the position after the last batch the loop
  took, so a checkpoint resumes at exactly the next one."""
  loader = task.train_loader(b.batch_size, seed=b.seed + _stage_salt(b.stage.name))
  it = pipeline.prefetch_to_device(iter(loader), b.prefetch, shd.batch_sharding(b.mesh))
  if data_state is not None:  # this process's position (mapped if the process count changed)
    data_state = shd.local_iterator_state(data_state, it.get_state(),
                                          int(state.step) * b.batch_size // jax.process_count())
  if data_state is not None:
    it.set_state(data_state)
  return it


# --- run_loop: the step, then the side tasks that are due --------------------------------------

def itstime(step: int, every: int, total: int, *, last: bool) -> bool:
  """Whether a periodic side task is due after `step` (1-based) of `total`: after every
  `every`-th step (0: never), and after the last one exactly when `last` (False: the finish
  phase does it there)."""
  if step == total:
    return last
  return bool(every) and step % every == 0


@dataclasses.dataclass
class Periodic:
  """A side task of the loop: `fn(step, state, metrics)` when `itstime(step, every, total,
  last=last)`, and after the step at which the processes agreed to stop when `at_stop`."""
  every: int
  fn: Callable
  last: bool = True
  at_stop: bool = False

  def __call__(self, step, total, stopping, state, metrics):
    if itstime(step, self.every, total, last=self.last) or (stopping and self.at_stop):
      self.fn(step, state, metrics)


class Clock:
  """The loop's wall times: the first (compiling) step, images/s between logged steps, and
  the loop from the end of the first step on, saves excluded."""

  def __init__(self, batch_size: int, start_step: int):
    self.batch_size, self.start_step = batch_size, start_step
    self.last_t, self.last_step = time.time(), start_step
    self.compile_s = None
    self.since = None   # (time, step) at the end of the first step
    self.save_s = 0.0

  def first_step(self, step, metrics, t0, stage_dir):
    jax.block_until_ready(metrics)
    self.compile_s = time.time() - t0
    self.last_t, self.last_step = time.time(), step
    self.since = (self.last_t, step)
    record(stage_dir, event="compile", step=step, seconds=self.compile_s)

  def images_per_s(self, step) -> float:
    now = time.time()
    rate = (step - self.last_step) * self.batch_size / max(now - self.last_t, 1e-9)
    self.last_t, self.last_step = now, step
    return rate


def _saver(b: Built, it, check, clock: Clock) -> Callable:
  """save(step, state): the state and every process's input position (a collective)."""
  def save(step, state):
    check(state)
    t = time.time()
    if state_io.save(b.mgr, step, state, shd.gather_iterator_states(it.get_state()), b.meta):
      clock.save_s += time.time() - t
      record(b.stage_dir, event="save", step=step, seconds=time.time() - t)
  return save


def side_tasks(b: Built, *, writer, bar, save, check, clock: Clock) -> List[Periodic]:
  """What runs after a step besides the step, in this order: the non-finite check and the
  metrics (every log_every steps, the last, and when stopping), the progress bar, the
  periodic checkpoint, and the stop (save, then Preempted)."""
  stage = b.stage

  def log_metrics(step, state, metrics):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    m["images_per_s"] = clock.images_per_s(step)
    check(state)
    if bar is not None:
      bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m.get('accuracy', float('nan')):.3f}",
                      img_s=f"{m['images_per_s']:.1f}")
    if writer is not None:
      for k, v in m.items():
        writer.add_scalar(f"{stage.name}/{k}", v, step)
      writer.flush()

  def preempt(step, state, metrics):
    save(step, state)
    if bar is not None:
      bar.close()
    why = (f"{stop.requested()} received" if stop.requested()
           else "another process received a stop signal")
    raise Preempted(f"{why}: stage {stage.name} stopped after step {step} "
                    f"and saved a checkpoint in {b.stage_dir}; run the same command again to "
                    "resume")

  actions = [Periodic(b.log_every, log_metrics, at_stop=True)]
  if bar is not None:
    actions.append(Periodic(1, lambda step, state, metrics: bar.update(1)))
  actions += [Periodic(b.checkpoint_every, lambda step, state, metrics: save(step, state),
                       last=False),
              Periodic(0, preempt, last=False, at_stop=True)]
  return actions


def run_loop(b: Built, state, it, actions: Sequence[Periodic], clock: Clock):
  """Steps up to total_steps; after each, the due side tasks. Returns the final state."""
  step = int(state.step)
  while step < b.total_steps:
    batch = next(it)
    t0 = time.time()
    state, metrics = b.jstep(state, b.teacher_vars, batch)
    step += 1
    # A stop signal may reach one host only, or hosts at different steps: all processes
    # agree on it after every step, so they save the same step together (a save is
    # collective) instead of one waiting forever in it.
    stopping = shd.any_process(stop.requested() is not None)
    if clock.compile_s is None:
      clock.first_step(step, metrics, t0, b.stage_dir)
    for action in actions:
      action(step, b.total_steps, stopping, state, metrics)
    stop.notify("step", f"{b.stage.name} {step}")
  return state


# --- finish: the final checkpoint, model.json and DONE -------------------------------------------

def finish(b: Built, task, state, clock: Clock, save) -> None:
  step = int(state.step)
  if clock.since is not None:  # end to end: loader + step + logging, saves excluded
    t1, s1 = clock.since
    record(b.stage_dir, event="end", step=step, steps_run=step - clock.start_step,
           timed_steps=step - s1, timed_seconds=time.time() - t1 - clock.save_s,
           batch_size=b.batch_size, max_rss_bytes=_max_rss())
  if step not in b.mgr.all_steps():
    save(step, state)
  stage = b.stage
  spec = dict(task.spec(), stage=stage.name, kind=stage.kind, method=stage.method,
              config_hash=b.meta["config_hash"], config=b.meta["config"],
              train_data=b.meta["train_data"],
              sizes=list(stage.sizes), compile_seconds=clock.compile_s,
              trained_steps=b.total_steps, resumed_from=clock.start_step,
              variables_hash=state_io.state_hash({"params": state.params,
                                                  "batch_stats": state.batch_stats}))
  if b.meta.get("teacher"):
    spec["teacher"] = b.meta["teacher"]
  if jax.process_index() == 0:
    ckpt_lib.write_spec(b.stage_dir, spec)
    with open(os.path.join(b.stage_dir, DONE), "w") as f:
      f.write(f"{b.total_steps}\n")


def record(stage_dir: str, **event) -> None:
  """One JSON line in STAGE/events.jsonl (compile, save, loop and evaluation times; askd_jax.tools.rehearse
  reads them)."""
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "events.jsonl"), "a") as f:
      f.write(json.dumps(dict(event, time=time.time())) + "\n")


def _max_rss() -> int:
  """This process's peak resident memory so far, in bytes."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def with_pretrained(state, pretrained, state_sh):
  """`state` with the subtrees of pretrained {'params': ..., 'batch_stats': ...} in place of
  the initialised ones, on the state's shardings; every array must keep its shape."""
  def overlay(tree, new, where):
    tree = dict(tree)
    for k, v in new.items():
      if k not in tree:
        raise ValueError(f"pretrained {where}/{k} has no counterpart in this model "
                         f"(it has {sorted(tree)[:8]}); the architectures differ")
      if isinstance(v, dict):
        tree[k] = overlay(tree[k], v, f"{where}/{k}")
      elif tuple(v.shape) != tuple(tree[k].shape):
        raise ValueError(f"pretrained {where}/{k} has shape {tuple(v.shape)} but this model "
                         f"needs {tuple(tree[k].shape)}; the architectures differ")
      else:
        tree[k] = jax.numpy.asarray(v, tree[k].dtype)
    return tree
  out = {}
  for col in ("params", "batch_stats"):
    if pretrained.get(col):
      new = overlay(getattr(state, col), pretrained[col], col)
      out[col] = jax.device_put(new, getattr(state_sh, col))
  return state.replace(**out)


def student_degrade_cfg(scfg, sizes):
  """The degradation a student of these sizes sees (also used to evaluate it)."""
  return {"sizes": tuple(sizes), "mode": scfg.get("mode", "official"),
          "blur": scfg.get("blur", "official"),
          "sigma_range": tuple(scfg.get("sigma_range", (0.1, 2.0)))}


def _check_finite(state, policy, max_bad, stage):
  bad = int(state.bad_steps)
  if not bad:
    return
  terms = {k: float(v) for k, v in jax.device_get(state.bad_terms).items()}
  # first_bad_step counts steps done before the bad one; report it 1-based, as the progress
  # bar and the checkpoint numbers do.
  at = int(state.first_bad_step) + 1
  msg = (f"stage {stage.name}: non-finite loss or gradient at step {at} "
         f"({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); {bad} step(s) skipped so far")
  if policy == "stop" or bad > max_bad:
    raise NonFiniteError(msg + "; the last good checkpoint is kept. Lower train.lr, check the "
                         "data, or set train.nan_policy=skip")
  log.warning(msg)


def _progress(enabled, name, total, initial):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, leave=True)


def _stage_salt(name: str) -> int:
  import zlib
  return zlib.crc32(name.encode()) % (2 ** 31)


def hashed_config(cfg, paths: bool = False) -> Dict[str, Any]:
  """The config fields that change what is trained (not paths or logging), as JSON values:
  what `cfg_hash` hashes, and what a stage records to say which fields changed. Where the data
  lives (data.data_dir, data.manual_dir) is not hashed: a stage records the identity of the
  data it read instead (`check_stage_data`). paths=True: the fields hashed before that
  (`cfg_hashes`)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  d = {k: v for k, v in d.items()
       if k not in ("workdir", "eval", "report", "jax_cache_dir", "distributed", "tune_cpu")}
  # How often to log/checkpoint and what to do on a NaN may change between restarts.
  for k in ("log_every", "checkpoint_every", "keep", "nan_policy", "max_bad_steps"):
    d.get("train", {}).pop(k, None)
  d.get("data", {}).pop("prefetch", None)  # how far ahead batches are placed, not which
  if not paths:
    for k in ("data_dir", "manual_dir"):
      d.get("data", {}).pop(k, None)
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def cfg_hash(cfg, paths: bool = False) -> str:
  """Hash of `hashed_config`."""
  import hashlib
  return hashlib.sha256(json.dumps(hashed_config(cfg, paths), sort_keys=True, default=str
                                   ).encode()).hexdigest()[:16]


def cfg_hashes(cfg) -> Tuple[str, str]:
  """The hashes a stage or workdir of this config may record: `cfg_hash`, and the one that
  also hashed the data paths (workdirs written before the data's identity was recorded)."""
  return cfg_hash(cfg), cfg_hash(cfg, paths=True)


def config_changes(old: Optional[Dict[str, Any]], new: Dict[str, Any], most: int = 4) -> str:
  """'model.width 0.125 -> 0.25, train.steps 4 -> 8' between two `hashed_config`s (old may
  hold more fields, e.g. a whole config.json's; only the hashed ones are compared); '' when
  the old one is unknown."""
  if not isinstance(old, dict):
    return ""

  def flat(d, pre=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and v:
        out.update(flat(v, f"{pre}{k}."))
      else:
        out[pre + k] = v
    return out
  a, b = flat(json.loads(json.dumps(old, default=str))), flat(new)
  changed = [f"{k} {json.dumps(a.get(k, '(absent)'))} -> {json.dumps(b.get(k, '(absent)'))}"
             for k in sorted(b)
             if a.get(k, "(absent)") != b.get(k, "(absent)")]
  more = f" and {len(changed) - most} more" if len(changed) > most else ""
  return ", ".join(changed[:most]) + more
