"""Preparing a tfds builder's array_record files once, safely across processes, and naming
what was prepared.

Several processes (the hosts of a run, or two runs sharing a data_dir) may ask for the same
data set at once: the first one writes it under an exclusive file lock, the others wait and
then read what it wrote. `prepared_identity` hashes the prepared records themselves, so two
copies of one set share an identity wherever they live, and two sets of different content
never do (tfds's dataset_info.json records sizes and counts, not a content hash). Preparing
the same source files again may give another identity: tfds does not write a record's
features in a fixed order.
"""
from __future__ import annotations

import contextlib
import hashlib
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


_IDENTITIES = {}  # (path, size, mtime_ns, inode) -> digest: each file is read once per process


def prepared_identity(builder_dir: str) -> str:
  """A 16-hex-digit content hash of a prepared tfds builder directory (`builder.data_dir`):
  the names and bytes of its files (features.json and the record shards), not its path, and
  not dataset_info.json (metadata, no records). Reads every byte once per process (about
  1 GB/s); FileNotFoundError if the directory holds no file."""
  names = sorted(n for n in os.listdir(builder_dir) if n != "dataset_info.json"
                 and os.path.isfile(os.path.join(builder_dir, n)))
  if not names:
    raise FileNotFoundError(f"{builder_dir}: no prepared files")
  h = hashlib.blake2b(digest_size=8)
  for n in names:
    path = os.path.join(builder_dir, n)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _IDENTITIES:
      f_hash = hashlib.blake2b(digest_size=16)
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          f_hash.update(chunk)
      _IDENTITIES[key] = f_hash.hexdigest()
    h.update(f"{n}\0{_IDENTITIES[key]}\0".encode())
  return h.hexdigest()
