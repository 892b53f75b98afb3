"""Stop requests (SIGTERM, SIGINT): the signal handler only records them.

Raising from a signal handler is unreliable: when the signal lands inside a garbage-collection
callback, a `__del__` or a C extension's callback, Python prints "Exception ignored in ..."
and the run goes on. So the handler sets a flag, and the work checks it at safe points: the
train loop after every step (it then saves that step), the other long phases (data
preparation, model building, compilation, evaluation batches, the report) through
`at(phase)`, which raises `Preempted` from ordinary code. A second SIGINT (Ctrl-C twice)
exits at once without saving.

`at()` also writes a `phase ...` line to the log (INFO), and calls the listeners tests
register to deliver signals at known moments.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable, List, Optional

log = logging.getLogger("askd_jax.phase")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """A stop signal was honoured; the same command resumes (exit status 0)."""


_requested: Optional[str] = None
_depth = 0
_old = {}
listeners: List[Callable[[str, str], None]] = []  # tests: called with (phase, detail)


def requested() -> Optional[str]:
  """The name of the first stop signal received ('SIGTERM'), or None."""
  return _requested


def _handle(signum, frame):  # only records; see the module docstring
  global _requested
  name = signal.Signals(signum).name
  if _requested is not None and signum == signal.SIGINT:
    os.write(2, b"\nerror: second SIGINT: exiting at once without saving; the newest "
                b"checkpoint is kept, run the same command again to resume\n")
    os._exit(130)
  if _requested is None:
    _requested = name
    os.write(2, f"\n{name} received: stopping at the next safe point (after the current "
                f"step, saving it); press Ctrl-C again to exit at once\n".encode())


def install() -> bool:
  """Install the handlers (main thread only); returns whether they were installed."""
  global _depth
  if threading.current_thread() is not threading.main_thread():
    return False
  if _depth == 0:
    for s in SIGNALS:
      _old[s] = signal.getsignal(s)
      signal.signal(s, _handle)
  _depth += 1
  return True


def uninstall() -> None:
  global _depth, _requested
  _depth -= 1
  if _depth == 0:
    for s, h in _old.items():
      signal.signal(s, h if h is not None else signal.SIG_DFL)
    _old.clear()
    _requested = None


@contextlib.contextmanager
def handling():
  """Handlers installed for the block (nested blocks share the outermost's)."""
  installed = install()
  try:
    yield
  finally:
    if installed:
      uninstall()


def check(where: str) -> None:
  """Raise Preempted if a stop was requested; `where` says what was interrupted."""
  if _requested is not None:
    raise Preempted(f"{_requested} received: stopped during {where} (finished stages and "
                    "checkpoints are kept); run the same command again to resume")


def at(phase: str, detail: str = "", quiet: bool = False) -> None:
  """A safe point at the start of `phase`: honour a pending stop, log, notify listeners."""
  check(f"{phase} {detail}".strip())
  if not quiet:
    log.info("phase %s %s", phase, detail)
  notify(phase, detail)


def notify(phase: str, detail: str = "") -> None:
  """Tell the listeners (tests) that `phase` was reached, without a safe point."""
  for f in list(listeners):
    f(phase, detail)
