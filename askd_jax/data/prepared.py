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
import errno
import hashlib
import os
from typing import Callable, Optional, Sequence, TypeVar

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


class _LocalFiles:
  """The part of TensorFlow that tfds's shuffler (tensorflow_datasets/core/shuffle.py,
  `_Bucket`) uses to spill a split larger than its 1 GB in-memory buffer to temporary files:
  `tf.io.gfile.GFile / exists / remove` and `tf.errors.ResourceExhaustedError`, on local files.
  askd_jax does not install TensorFlow (1.3 GB), and without it preparing such a split (the
  real IJB-C's aligned crops, CASIA-WebFace) stopped with "No module named 'tensorflow'"."""

  class errors:  # pylint: disable=invalid-name
    class ResourceExhaustedError(OSError):
      message = ""

  class io:  # pylint: disable=invalid-name
    class gfile:  # pylint: disable=invalid-name
      exists = staticmethod(os.path.exists)
      remove = staticmethod(os.remove)

      @staticmethod
      def GFile(path, mode):  # pylint: disable=invalid-name
        try:
          return open(path, mode)
        except OSError as e:  # up to 1,000 buckets open at once: raise the limit as tfds does
          if e.errno != errno.EMFILE:
            raise
          from tensorflow_datasets.core import shuffle
          shuffle._increase_open_files_limit()  # pylint: disable=protected-access
          return open(path, mode)


def _spill_to_local_files() -> None:
  """Where TensorFlow is not installed, tfds's shuffler spills through `_LocalFiles`."""
  from tensorflow_datasets.core import shuffle
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return  # tfds's own path
  except ImportError:
    shuffle.tf = _LocalFiles


def write_array_record(builder: tfds.core.DatasetBuilder, manual_dir: Optional[str] = None,
                       ) -> None:
  """`builder.download_and_prepare` as array_record from `manual_dir`'s files (nothing is
  downloaded), splits of any size without TensorFlow (`_spill_to_local_files`)."""
  _spill_to_local_files()
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None else os.fspath(manual_dir),
          try_download_gcs=False))


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
      write_array_record(builder, manual_dir)
      builder = make()
  stop.at("prepared", lock_name)
  return builder


_IDENTITIES = {}  # (path, size, mtime_ns, inode) -> digest: each file is read once per process


def prepared_identity(*builder_dirs: str, splits: Optional[Sequence[str]] = None) -> str:
  """A 16-hex-digit content hash of prepared tfds builder directories (`builder.data_dir`),
  in the order given: the names and bytes of their files (features.json and the record
  shards; with `splits`, only those splits' shards), not their paths, and not
  dataset_info.json (metadata, no records). Reads every byte once per process (300 MB in
  1.0 s on a shared 2-core x86_64 VM); FileNotFoundError for a directory with no such file."""
  def wanted(n):
    return n != "dataset_info.json" and (splits is None or ".array_record-" not in n
                                         or any(f"-{sp}.array_record-" in n for sp in splits))
  h = hashlib.blake2b(digest_size=8)
  for d in builder_dirs:
    names = sorted(n for n in os.listdir(d) if wanted(n) and os.path.isfile(os.path.join(d, n)))
    if not names:
      raise FileNotFoundError(f"{d}: no prepared files")
    for n in names:
      path = os.path.join(d, n)
      st = os.stat(path)
      key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
      if key not in _IDENTITIES:
        f_hash = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
          for chunk in iter(lambda: f.read(1 << 20), b""):
            f_hash.update(chunk)
        _IDENTITIES[key] = f_hash.hexdigest()
      h.update(f"{n}\0{_IDENTITIES[key]}\0".encode())
    h.update(b"\1")  # where one directory ends
  return h.hexdigest()
