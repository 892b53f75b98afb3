"""Preparing a tfds builder's array_record files once, safely across processes.

Several processes (the hosts of a run, or two runs sharing a data_dir) may ask for the same
data set at once: the first one writes it under an exclusive file lock, the others wait and
then read what it wrote.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, TypeVar

import tensorflow_datasets as tfds

B = TypeVar("B", bound=tfds.core.DatasetBuilder)


def default_data_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own default)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def resolve_data_dir(data_dir: Optional[str]) -> str:
  return os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive inter-process lock (POSIX flock); a no-op where fcntl does not exist."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover (Windows)
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(make: Callable[[], B], data_dir: str, lock_name: str,
                 manual_dir: Optional[str] = None) -> B:
  """`make()` prepared as array_record (from `manual_dir`'s files if given; nothing is
  downloaded), written by one process under `data_dir/lock_name`; returns a fresh builder."""
  from askd_jax import stop
  builder = make()
  if builder.is_prepared():
    return builder
  stop.at("prepare", lock_name)
  os.makedirs(data_dir, exist_ok=True)
  with file_lock(os.path.join(data_dir, lock_name)):
    builder = make()  # another process may have written it while this one waited
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                       try_download_gcs=False))
      builder = make()
  stop.at("prepared", lock_name)
  return builder
