"""A failure as an exit status and one line that names the file, flag or value and the fix.

`describe_failure` is the one place an exception becomes that line: the CLI prints it
(askd_jax/main.py) and `experiment.run` writes it above the full trace in WORKDIR/run.log.
"""
from __future__ import annotations

import errno
import os
import re

from askd_jax import stop


class UsageError(ValueError):
  """A bad flag or flag value (exit status 2)."""


def first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _known() -> tuple:
  """The package's own refusals: their one line says everything."""
  from askd_jax.config_check import ConfigError
  from askd_jax.train.loop import NonFiniteError, StageConfigError
  from askd_jax.train.state_io import CheckpointError
  from askd_jax.workdir import WorkdirError
  return (ConfigError, NonFiniteError, StageConfigError, CheckpointError, WorkdirError,
          UsageError)


def unexpected(e: BaseException) -> bool:
  """A failure whose one line may not say enough (neither one of the package's own refusals
  nor an OSError): the CLI points at the full trace."""
  return not isinstance(e, _known()) and not isinstance(e, OSError)


def describe_failure(e: BaseException, cfg, workdir: str):
  """(exit status, one line) for a failure; (None, None) for a non-error exit (SystemExit)."""
  from askd_jax.config_check import ConfigError
  if isinstance(e, stop.Preempted):
    return 0, str(e)
  if isinstance(e, SystemExit):
    return None, None
  if isinstance(e, KeyboardInterrupt):  # SIGINT before the handlers were installed
    return 130, "SIGINT received before the run started; nothing was done"
  if isinstance(e, (ConfigError, UsageError)):
    return 2, first_line(e)
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM,
                                            errno.EROFS, errno.EDQUOT):
    return 1, _os_error_line(e, cfg, workdir)
  if isinstance(e, _known()):
    return 1, first_line(e)
  for code, hint in ((errno.ENOSPC, "No space left on device"),
                     (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
    if hint in str(e):  # wrapped by a library (orbax, tensorstore)
      return 1, _os_error_line(OSError(code, hint, _path_in(str(e))), cfg, workdir)
  if isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
    return 1, first_line(e)
  return 1, f"{type(e).__name__}: {first_line(e)}"


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
