"""The workdir: one process at a time (a lock), one config (a guard that checks before it writes).

* `Lock`: `fcntl.flock` on `WORKDIR/.lock`, which holds the owner's pid. The kernel releases
  a flock when its process dies, so a lock left by a killed run is free; the pid still in the
  file says who left it, and the new run prints that it took the lock over.
* `guard`: `WORKDIR/config.json` holds the hash of the config fields that change what is
  trained, and every stage records the hash it was trained with (`model.json` of a finished
  stage, the `meta` item of each checkpoint step). Every check runs before anything is written,
  so a refused run changes nothing and the original command still resumes.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Any, Optional

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class WorkdirError(RuntimeError):
  """The workdir is in use or holds another config's run (exit status 1)."""


def _write_atomic(path: str, write) -> None:
  """The old file or the whole new one, never a part; nothing is left behind when the write
  fails (e.g. the disk is full)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Atomic text write (`_write_atomic`)."""
  _write_atomic(path, lambda f: f.write(text))


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (`_write_atomic`)."""
  _write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """One process per workdir. `acquire` raises WorkdirError when another live process holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._f = None

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, LOCK_FILE)

  def acquire(self) -> Optional[str]:
    """Take the lock; returns a line to print when it took over a dead process's lock."""
    import fcntl
    os.makedirs(self.workdir, exist_ok=True)
    if os.path.isdir(self.path):
      raise WorkdirError(f"{self.path} is a folder, but it must be the workdir's lock file; "
                         f"remove it (rm -r {self.path}) and run the same command again")
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        f.close()
        raise
      f.seek(0)
      owner = f.read().strip() or "?"
      f.close()
      raise WorkdirError(
          f"{self.workdir} is in use by process {owner} (it holds {self.path}); wait for that "
          "run to finish or stop it, or use another --workdir") from None
    f.seek(0)
    left = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._f = f
    if left.isdigit() and int(left) != os.getpid():
      state = ("no longer running (a killed run)" if not _alive(int(left)) else
               "not holding it (a killed run whose pid now names another process, or a run "
               "in another container or on another machine that has ended)")
      return f"took over the lock {self.path} left by process {left}, which is {state}; resuming"
    return None

  def release(self) -> None:
    """Clear the pid (a clean exit leaves no stale owner) and unlock."""
    if self._f is None:
      return
    import fcntl
    try:
      self._f.seek(0)
      self._f.truncate()
    except OSError:
      pass
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()
    self._f = None

  def move(self, workdir: str) -> None:
    """Hold the lock of `workdir` instead (after the old run was moved aside)."""
    self.release()
    self.workdir = workdir
    self.acquire()


def _stage_dirs(workdir: str):
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    d = os.path.join(workdir, name)
    if os.path.isdir(d) and (os.path.exists(os.path.join(d, "model.json"))
                             or os.path.isdir(os.path.join(d, "checkpoints"))):
      yield d


def guard(workdir: str, cfg, overwrite: bool, lock: Optional[Lock] = None) -> None:
  """Refuse to mix two configs' runs in one workdir unless asked to start afresh; writes
  config.json only after every check passed."""
  from askd_jax.train.loop import (StageConfigError, cfg_hash, cfg_hashes,
                                   check_stage_config, config_changes, hashed_config)
  path = os.path.join(workdir, "config.json")
  mine = {"config_hash": cfg_hash(cfg), "config": json.loads(cfg.to_json_best_effort())}
  fields = hashed_config(cfg)
  problem = None
  old = None
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict) or "config_hash" not in old:
      # Cut short or edited: each stage records its own config hash and is checked below,
      # so the file is written again rather than blocking the run.
      log.warning("%s is unreadable; checking the stages' own config records instead and "
                  "writing it again", path)
      old = None
  if old is not None:
    if old.get("config_hash") not in cfg_hashes(cfg):
      changed = config_changes(old.get("config"), fields)
      what = (f"changed: {changed}" if changed
              else f"hash {old.get('config_hash')} vs {mine['config_hash']}")
      problem = (f"{workdir} holds a run with another config ({what}); run it with the "
                 "values it was trained with, use another --workdir, or pass --overwrite to "
                 "move the old run aside and start afresh")
  if problem is None:
    for d in _stage_dirs(workdir):  # config.json may be gone; each stage knows its config
      try:
        check_stage_config(d, cfg_hashes(cfg), fields)
      except StageConfigError as e:
        problem = str(e)
        break
  if problem is not None:
    if not overwrite:
      raise WorkdirError(problem)
    backup = f"{workdir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(workdir, backup)
    print(f"moved the previous run to {backup}")
    if lock is not None:
      lock.move(workdir)
  os.makedirs(workdir, exist_ok=True)
  write_json(path, mine)
