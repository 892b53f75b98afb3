"""Stage checkpoints: orbax CheckpointManager, atomic, newest intact step restored.

Each step directory holds three items:
  state: the TrainState (params, batch stats, optimizer state, step, RNG, NaN guard)
  data:  the input iterator's position (grain state, JSON)
  meta:  what the state depends on (config hash, teacher path and params hash) and a hash
         of the state itself, checked on restore
Orbax writes into a temporary directory and renames it when complete, so a killed writer
never leaves a step that looks complete (leftover temporary directories are removed when
the manager opens). A step that cannot be read, or whose arrays no longer match the hash
written beside them (disk corruption that orbax would restore silently), is moved aside
to `<step>.unreadable-<time>` and the previous step is restored instead, with a warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from askd_jax.train.hashing import params_hash
from askd_jax.train.sharding import restore_replicated

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No step of a stage's checkpoint directory can be restored."""


def manager(ckdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                      read_only=read_only, enable_async_checkpointing=False,
                                      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(ckdir), options=opts,
                               item_names=("state", "data", "meta"))


def data_hash(data_state) -> str:
  """Hash of the iterator position saved beside the state (an edited position is refused)."""
  text = data_state.decode() if isinstance(data_state, bytes) else json.dumps(data_state)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def newest_meta_value(ckdir: str, key: str):
  """(meta[key] of the newest step that has a readable meta item, its file), or (None, None);
  read as plain JSON, without restoring anything."""
  if not os.path.isdir(ckdir):
    return None, None
  for step in sorted((int(n) for n in os.listdir(ckdir) if n.isdigit()), reverse=True):
    path = os.path.join(ckdir, str(step), "meta", "metadata")
    try:
      with open(path) as f:
        value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
      continue
    return value, path
  return None, None


def _drop_closed_loop_errors() -> None:
  """Install (once) hooks that log, instead of printing, the "RuntimeError: Event
  loop is closed" that tensorstore's callbacks raise when they finish after orbax's asyncio
  loop gave up on a failed read (they reach sys.excepthook from C, possibly after
  `_quiet_libraries` has put sys.stderr back); every other exception goes to the old hooks."""
  import sys
  old = sys.excepthook
  if getattr(old, "_askd_drops_closed_loop", False):
    return

  def hook(etype, value, tb):
    if etype is RuntimeError and str(value) == "Event loop is closed":
      log.info("a checkpoint library callback ran after its event loop closed (ignored)")
      return
    old(etype, value, tb)
  hook._askd_drops_closed_loop = True
  sys.excepthook = hook
  old_unraisable = sys.unraisablehook

  def unraisable(u):  # the same error, when it reaches Python as "Exception ignored in"
    if u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed":
      log.info("a checkpoint library callback ran after its event loop closed (ignored)")
      return
    old_unraisable(u)
  sys.unraisablehook = unraisable

  def failed_reads(record):
    # The tasks of a read orbax gave up on are finalised whenever the garbage collector
    # reaches them, possibly after `_quiet_libraries` ended: asyncio then logs each as
    # "Task exception was never retrieved" (or "Future exception ...", for a future of such a
    # task) with its traceback. Only orbax uses asyncio here.
    if record.getMessage().startswith(("Task exception was never retrieved",
                                       "Future exception was never retrieved")):
      log.info("a failed checkpoint library task was finalised (ignored): %s",
               record.exc_info[1] if record.exc_info else "")
      return False
    return True
  logging.getLogger("asyncio").addFilter(failed_reads)
  # The coroutines of such a read that never started are finalised the same way, and Python
  # warns "RuntimeWarning: coroutine 'Store._get_array_metadatas' was never awaited" (with
  # the source line the collector happened to run at, e.g. an import) after the quiet block.
  import warnings
  warnings.filterwarnings("ignore", message=r"coroutine '\S+' was never awaited",
                          category=RuntimeWarning)


@contextlib.contextmanager
def _quiet_libraries():
  """Orbax and tensorstore log a failed read or write at length (thousands of lines of
  traceback for a truncated step); the callers say it in one line."""
  import io
  import sys
  _drop_closed_loop_errors()
  loggers = [logging.getLogger(n) for n in ("orbax", "absl", "tensorstore", "jax")]
  old = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  # Orbax's asyncio callbacks print "RuntimeError: Event loop is closed" tracebacks straight
  # to sys.stderr when a read fails: kept for the log file (INFO) instead of the terminal.
  err, sys.stderr = sys.stderr, io.StringIO()
  try:
    yield
  finally:
    captured, sys.stderr = sys.stderr.getvalue(), err
    for l, lv in zip(loggers, old):
      l.setLevel(lv)
    if captured.strip():
      log.info("output of the libraries while reading a checkpoint:\n%s", captured)


def state_hash(state) -> Optional[str]:
  """Hash of every array of the state, or None where this process cannot see them all."""
  leaves = jax.tree.leaves(state)
  if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return None  # several processes: each holds only its shards
  return params_hash(state)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: Optional[bytes],
         meta: Dict[str, Any], force: bool = True) -> bool:
  """Write `step` (blocking). A step already on disk is kept as is (the state at a step is
  deterministic, so a second save, e.g. SIGTERM right after a periodic one, adds nothing).
  Returns whether a step was written."""
  if step in mgr.all_steps():
    return False
  data = {"iterator": data_state.decode() if isinstance(data_state, bytes) else data_state}
  meta = dict(meta, state_hash=state_hash(state), data_hash=data_hash(data["iterator"]))
  if meta["state_hash"] is not None and hasattr(state, "params"):
    meta["params_hash"] = params_hash(state.params)  # checked when loaded as a teacher
  with _quiet_libraries():  # a failed write (disk full) is reported once, by the caller
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data),
                                           meta=ocp.args.JsonSave(meta)), force=force)
    mgr.wait_until_finished()
  return True


def _set_aside(mgr: ocp.CheckpointManager, step: int) -> Optional[str]:
  """Rename an unreadable step so orbax no longer lists it (and a new save of that step
  number can happen); kept on disk for inspection. Only the primary process renames."""
  src = os.path.join(str(mgr.directory), str(step))
  dst = f"{src}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0 and os.path.isdir(src) and not mgr._options.read_only:
    os.rename(src, dst)
    mgr.reload()
    return dst
  return None


def _layout_mismatch(mgr: ocp.CheckpointManager, step: int, abstract_state) -> Optional[str]:
  """How the saved state's arrays differ from this run's (None: same). Raises when the
  step's metadata cannot be read (then the step is corrupt)."""
  md = ocp.StandardCheckpointer().metadata(os.path.join(str(mgr.directory), str(step), "state"))
  md = getattr(md, "item_metadata", md)
  saved = jax.tree_util.tree_flatten_with_path(getattr(md, "tree", md))[0] if md else []
  if not saved:
    raise ValueError("no readable array metadata")
  mine = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  key = lambda path: tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                           for k in path)
  saved = {key(p): tuple(m.shape) for p, m in saved}
  mine = {key(p): tuple(a.shape) for p, a in mine}
  if saved.keys() != mine.keys():
    extra, missing = sorted(saved.keys() - mine.keys()), sorted(mine.keys() - saved.keys())
    return (f"arrays only in the checkpoint: {['/'.join(k) for k in extra[:3]]}, only in this "
            f"run: {['/'.join(k) for k in missing[:3]]}")
  diff = [k for k in mine if saved[k] != mine[k]]
  if diff:
    k = diff[0]
    return f"{'/'.join(k)} has shape {saved[k]} there but {mine[k]} in this run"
  return None


def restore_latest(mgr: ocp.CheckpointManager, abstract_state
                   ) -> Optional[Tuple[int, Any, Optional[bytes], Dict[str, Any]]]:
  """(step, state, data_state, meta) of the newest intact step, or None if there is none.

  Only a corrupt step (unreadable, or arrays that no longer match their hash) is set aside;
  a step that is intact but was written by another model or optimiser layout stops the run
  with an error and stays where it is."""
  steps = sorted(mgr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      mismatch = _layout_mismatch(mgr, step, abstract_state)
    except Exception:  # unreadable metadata: corrupt, handled below with the restore error
      mismatch = None
    if mismatch:
      raise ValueError(f"{mgr.directory}: checkpoint step {step} holds a different model or "
                       f"optimiser than this run builds ({mismatch}); restore the config it "
                       "was trained with, or use a new --workdir")
    try:
      with _quiet_libraries():
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      meta = dict(out["meta"] or {})
      want, got = meta.get("state_hash"), None
      if want is not None:
        got = state_hash(out["state"])
        if got is not None and got != want:
          raise ValueError(f"its arrays hash to {got}, but {want} was written")
      it_want = meta.get("data_hash")
      it_got = data_hash((out["data"] or {}).get("iterator"))
      if it_want is not None and it_got != it_want:
        raise ValueError(f"its data-iterator position hashes to {it_got}, but {it_want} was "
                         "written")
    except Exception as e:  # corrupt or partial step: fall back to the previous one
      nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      moved = _set_aside(mgr, step)
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); %s%s", step, mgr.directory,
                  type(e).__name__, _first_line(e), nxt,
                  f" (moved to {moved})" if moved else "")
      continue
    it = out["data"].get("iterator") if out["data"] else None
    return step, out["state"], (it.encode() if isinstance(it, str) else None), meta
  if steps:
    raise CheckpointError(f"{mgr.directory}: none of the checkpoint steps {sorted(steps)} can "
                          "be read (set aside as *.unreadable-*); delete the directory to "
                          "train the stage again from scratch")
  return None


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0][:200] if lines else ""


def retrain_hint(stage_dir: str) -> str:
  """The one command that trains a finished stage's last steps again."""
  return (f"rm {os.path.join(stage_dir, 'DONE')}, then run the training command again: the "
          "stage resumes from its newest intact checkpoint (from scratch if none is left) and "
          "ends with the same weights")


def load_final_variables(stage_dir: str, step: int, want_hash: Optional[str] = None
                         ) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of a finished stage: its final step `step`, checked against
  the hash written beside it (`want_hash`, of params and batch_stats, from model.json; the
  step's params hash for stages written before). A final step that is missing or damaged is a
  CheckpointError naming the way to train it again: a finished model is its final weights,
  never an older step's (falling back is for resuming a stage that is still training)."""
  ckdir = os.path.join(stage_dir, "checkpoints")
  where = os.path.join(ckdir, str(step))
  if not os.path.isdir(where):
    reason = ("its checkpoints folder is missing" if not os.path.isdir(ckdir)
              else "no such step")
  else:
    try:
      with _quiet_libraries():
        st = restore_replicated(os.path.join(where, "state"))
        meta = manager(ckdir, read_only=True).restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      variables = {"params": st["params"], "batch_stats": st["batch_stats"]}
      if want_hash is not None:
        got = params_hash(variables)
      else:
        want_hash, got = (meta or {}).get("params_hash"), params_hash(variables["params"])
      if want_hash is not None and got != want_hash:
        raise ValueError(f"its weights hash to {got}, but {want_hash} was written")
      return variables
    except Exception as e:
      reason = f"{type(e).__name__}: {_first_line(e)}"
  raise CheckpointError(f"{where}: the final weights of the finished stage {stage_dir} cannot "
                        f"be read ({reason}); an older step is not used in their place. "
                        f"Train its last steps again: {retrain_hint(stage_dir)}")


def load_latest_variables(ckdir: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of the newest readable step (for evaluation / as a teacher),
  replicated on this run's devices whatever process / device layout wrote the step."""
  mgr = manager(ckdir, read_only=True)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      with _quiet_libraries():
        st = restore_replicated(os.path.join(str(mgr.directory), str(step), "state"))
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      variables = {"params": st["params"], "batch_stats": st["batch_stats"]}
      want = (meta or {}).get("params_hash")
      if want is not None and params_hash(variables["params"]) != want:
        raise ValueError("its parameters no longer match the hash written beside them")
    except Exception as e:
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one", step,
                  ckdir, type(e).__name__, _first_line(e))
      continue
    return variables
  raise FileNotFoundError(f"{ckdir}: no readable checkpoint; train that stage first")
