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

import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from askd_jax.train.checkpoint import params_hash

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No step of a stage's checkpoint directory can be restored."""


def manager(ckdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                      read_only=read_only, enable_async_checkpointing=False,
                                      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(ckdir), options=opts,
                               item_names=("state", "data", "meta"))


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
  meta = dict(meta, state_hash=state_hash(state))
  if meta["state_hash"] is not None and hasattr(state, "params"):
    meta["params_hash"] = params_hash(state.params)  # checked when loaded as a teacher
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


def restore_latest(mgr: ocp.CheckpointManager, abstract_state
                   ) -> Optional[Tuple[int, Any, Optional[bytes], Dict[str, Any]]]:
  """(step, state, data_state, meta) of the newest intact step, or None if there is none."""
  steps = sorted(mgr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
      meta = dict(out["meta"] or {})
      want, got = meta.get("state_hash"), None
      if want is not None:
        got = state_hash(out["state"])
        if got is not None and got != want:
          raise ValueError(f"its arrays hash to {got}, but {want} was written")
    except Exception as e:  # corrupt or partial step: fall back to the previous one
      nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      moved = _set_aside(mgr, step)
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); %s%s", step, mgr.directory,
                  type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", nxt,
                  f" (moved to {moved})" if moved else "")
      continue
    it = out["data"].get("iterator") if out["data"] else None
    return step, out["state"], (it.encode() if isinstance(it, str) else None), meta
  if steps:
    raise CheckpointError(f"{mgr.directory}: none of the checkpoint steps {sorted(steps)} can "
                          "be read (set aside as *.unreadable-*); delete the directory to "
                          "train the stage again from scratch")
  return None


def load_latest_variables(ckdir: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of the newest readable step (for evaluation / as a teacher)."""
  mgr = manager(ckdir, read_only=True)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
      st = out["state"]
      get = (lambda k: st[k]) if isinstance(st, dict) else (lambda k: getattr(st, k))
      variables = {"params": get("params"), "batch_stats": get("batch_stats")}
      want = (out["meta"] or {}).get("params_hash")
      if want is not None and params_hash(variables["params"]) != want:
        raise ValueError("its parameters no longer match the hash written beside them")
    except Exception as e:
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one", step,
                  ckdir, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
      continue
    return variables
  raise FileNotFoundError(f"{ckdir}: no readable checkpoint; train that stage first")
