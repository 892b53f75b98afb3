"""Output paths checked before a tool does any work (embed, export, convert, report, align).

A tool that embeds thousands of images or converts a checkpoint and only then finds that its
output cannot be written throws the work away. `check_output` is called first, with the flag
that named the path, and refuses in one line: an existing output without --overwrite, a folder
where a file goes (or the reverse), a parent that is a file, or a place that is not writable.
Missing parent folders are fine: `make_parent` creates them when the result is written.
"""
from __future__ import annotations

import os


class OutputPathError(ValueError):
  """An output path that cannot be written; the message names the flag and the fix."""


def check_output(flag: str, path: str, *, overwrite: bool = True, directory: bool = False,
                 extra=()) -> str:
  """The absolute `path` if the tool can write it (a file, or a folder with directory=True),
  else OutputPathError naming `flag`. `extra`: files written beside it (a sidecar), checked
  for existence the same way."""
  ap = os.path.abspath(os.path.expanduser(path))
  for p in (ap, *extra):
    if os.path.isdir(p) and not directory:
      raise OutputPathError(f"{flag}={path}: {p} is a folder; give a file name "
                            "(e.g. inside that folder)")
    if os.path.exists(p) and not os.path.isdir(p) and directory:
      raise OutputPathError(f"{flag}={path}: {p} is a file; give a folder")
    if os.path.exists(p) and not overwrite:
      raise OutputPathError(f"{flag}={path}: {p} exists; choose another path or pass "
                            "--overwrite to replace it")
  d = ap if directory and os.path.isdir(ap) else os.path.dirname(ap)
  while not os.path.exists(d):  # the nearest existing ancestor decides
    d = os.path.dirname(d)
  if not os.path.isdir(d):
    raise OutputPathError(f"{flag}={path}: {d} is a file, not a folder, so nothing can be "
                          "written under it; choose another path")
  if not os.access(d, os.W_OK | os.X_OK):
    raise OutputPathError(f"{flag}={path}: {d} is not writable (Permission denied); make it "
                          "writable or choose another path")
  return ap


def make_parent(path: str) -> None:
  """Create the folders above `path` (checked writable by `check_output`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
