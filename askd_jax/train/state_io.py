"""Stage checkpoints: orbax CheckpointManager, atomic, newest complete step restored.

Each step directory holds three items:
  state: the TrainState (params, batch stats, optimizer state, step, RNG, NaN guard)
  data:  the input iterator's position (grain state, JSON)
  meta:  what the state depends on (config hash, teacher path and params hash)
Orbax writes into a temporary directory and renames it when complete, so a killed writer
never leaves a step that looks complete. If the newest step is still unreadable (disk
corruption), restore falls back to the previous one and says so.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(ckdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                      read_only=read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(ckdir), options=opts,
                               item_names=("state", "data", "meta"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: Optional[bytes],
         meta: Dict[str, Any], force: bool = True) -> None:
  data = {"iterator": data_state.decode() if isinstance(data_state, bytes) else data_state}
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=ocp.args.JsonSave(data),
                                         meta=ocp.args.JsonSave(meta)), force=force)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, abstract_state
                   ) -> Optional[Tuple[int, Any, Optional[bytes], Dict[str, Any]]]:
  """(step, state, data_state, meta) of the newest readable step, or None if there is none."""
  steps = sorted(mgr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                      data=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
    except Exception as e:  # corrupt or partial step: fall back to the previous one
      nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); %s", step, mgr.directory,
                  type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", nxt)
      continue
    it = out["data"].get("iterator") if out["data"] else None
    return step, out["state"], (it.encode() if isinstance(it, str) else None), dict(out["meta"])
  if steps:
    raise RuntimeError(f"{mgr.directory}: none of the checkpoint steps {sorted(steps)} can be "
                       "read; delete the directory to start the stage again")
  return None


def load_latest_variables(ckdir: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of the newest readable step (for evaluation / as a teacher)."""
  mgr = manager(ckdir, read_only=True)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:
      log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", step, ckdir,
                  type(e).__name__)
      continue
    st = out["state"]
    get = (lambda k: st[k]) if isinstance(st, dict) else (lambda k: getattr(st, k))
    return {"params": get("params"), "batch_stats": get("batch_stats")}
  raise FileNotFoundError(f"{ckdir}: no readable checkpoint; train that stage first")
