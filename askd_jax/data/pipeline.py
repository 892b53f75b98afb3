"""The input pipeline every task uses: grain loaders over random-access sources.

A source is anything with `__len__` and `__getitem__` that returns a dict record holding at
least 'image' (uint8 (H, W, 3), or whatever the caller's transforms decode into that) and
'label' (e.g. `builder.as_data_source(split)`). Loaders yield per-process batches
{'image': uint8 (B, H, W, 3), 'label': int32 (B,)} with B = global_batch_size // processes.

* Train: grain `IndexSampler` (shuffled with `seed`, sharded by JAX process, `num_epochs`
  or endless); the order and the random augmentations depend only on the seed, and the
  iterator's position is saved and restored with `get_state()` / `set_state()` or orbax
  (`grain.PyGrainCheckpointSave` / `PyGrainCheckpointRestore`).
* Eval: in order, one epoch, padded to whole global batches; a 'mask' key marks the real
  records, so every record is seen exactly once and every process runs the same number of
  steps (collectives stay in lockstep on several hosts).
* `prefetch_to_device` turns per-process numpy batches into global `jax.Array`s sharded
  along the batch axis, a few batches ahead, keeping the resumable state in step with what
  was consumed.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import grain.python as grain
import jax
import numpy as np

Record = Dict[str, Any]
DEFAULT_KEYS = ("image", "label")


def _watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
  """In a loader worker process: exit when the process that made the loader is gone (killed
  with SIGKILL, its workers would otherwise live on under PID 1, holding their memory)."""
  first_ppid = os.getppid()

  def gone() -> bool:
    if os.getppid() != first_ppid:  # re-parented: the parent died
      return True
    try:
      os.kill(parent_pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      pass
    return False

  def watch():
    while not gone():
      time.sleep(every_s)
    os._exit(0)
  threading.Thread(target=watch, name="askd-parent-watch", daemon=True).start()


_watching = set()


def _format_record(keys, parent_pid):
  """Unpickling a loader's operations in a worker process also starts the parent watch."""
  if os.getpid() != parent_pid and parent_pid not in _watching:
    _watching.add(parent_pid)
    _watch_parent(parent_pid)
  return FormatRecord(tuple(keys), parent_pid)


@dataclasses.dataclass(frozen=True)
class FormatRecord(grain.MapTransform):
  """Keep `keys`; image -> uint8, label -> int32, mask -> bool, others as numpy arrays.

  Every loader ends its records with this transform, so its unpickling in a grain worker
  process is where the worker learns to exit with its parent (`_watch_parent`)."""
  keys: Sequence[str] = DEFAULT_KEYS
  parent_pid: int = dataclasses.field(default_factory=os.getpid, compare=False)

  def __reduce__(self):
    return _format_record, (tuple(self.keys), self.parent_pid)

  def map(self, record: Record) -> Record:
    missing = [k for k in self.keys if k not in record]
    if missing:
      raise KeyError(f"record has no {missing} (keys: {sorted(record)}); add a transform "
                     "that produces them or change `keys`")
    dtypes = {"image": np.uint8, "label": np.int32, "mask": np.bool_}
    out = {}
    for k in self.keys:
      v = np.asarray(record[k])
      if k in dtypes and v.dtype != dtypes[k]:
        if k == "image" and v.dtype != np.uint8:
          raise ValueError(f"record['image'] has dtype {v.dtype}, the loaders carry uint8; "
                           "convert in a transform (scale to [-1, 1] on device)")
        v = v.astype(dtypes[k])
      out[k] = v
    return out


def _check_workers(worker_count: int) -> None:
  """Grain's worker processes read absl flags; outside `app.run` mark them parsed (defaults).
  They also must not take the terminal's Ctrl-C (`_workers_keep_out_of_ctrl_c`)."""
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0 (0 reads in this process)")
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    _workers_keep_out_of_ctrl_c()


def _workers_keep_out_of_ctrl_c() -> None:
  """Start every spawned process (grain's workers) with SIGINT blocked, once per process.

  Ctrl-C reaches the terminal's whole process group. The main process stops at its next safe
  point and shuts the workers down itself, but each worker also took the SIGINT: it died with
  a KeyboardInterrupt traceback (most often while still importing, before grain runs any
  `worker_init_fn`), the main process then failed on "Worker process was terminated
  unexpectedly", and the resource tracker warned of leaked shared memory. Grain starts its
  workers from its own threads through multiprocessing's spawn, so the signal is blocked in
  the spawning thread around the fork+exec, which the child inherits: what CPython's
  resource_tracker does for its own process (multiprocessing/resource_tracker.py)."""
  import multiprocessing.util as mp_util
  import signal
  spawn = mp_util.spawnv_passfds
  if getattr(spawn, "_askd_blocks_sigint", False) or not hasattr(signal, "pthread_sigmask"):
    return

  def spawnv_passfds(*args, **kwargs):
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
      return spawn(*args, **kwargs)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)
  spawnv_passfds._askd_blocks_sigint = True
  mp_util.spawnv_passfds = spawnv_passfds


def _shard_count(shard_options: grain.ShardOptions) -> int:
  return int(shard_options.shard_count)


def _local_batch(global_batch_size: int, shard_options: grain.ShardOptions) -> int:
  n = _shard_count(shard_options)
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"the process count {n}")
  return global_batch_size // n


def make_train_loader(source, *, global_batch_size: int, seed: int,
                      num_epochs: Optional[int] = None, transforms: Sequence[Any] = (),
                      worker_count: int = 0, drop_remainder: bool = True,
                      keys: Sequence[str] = DEFAULT_KEYS,
                      shard_options: Optional[grain.ShardOptions] = None,
                      read_options: Optional[grain.ReadOptions] = None) -> grain.DataLoader:
  """Shuffled, sharded, batched loader; deterministic given `seed`, the process layout and
  `worker_count` (grain's workers each build whole batches, so the batch order depends on it;
  keep it fixed across a resume).

  `transforms` (grain Map/RandomMap transforms, e.g. askd_jax.data.augment) run per record
  before the record is reduced to `keys`. `shard_options` defaults to this JAX process's
  shard (`ShardByJaxProcess`); tests pass `ShardOptions` to play several processes.
  """
  if len(source) == 0:
    raise ValueError("the training source is empty; check the dataset split")
  _check_workers(worker_count)
  shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
  local = _local_batch(global_batch_size, shard_options)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options,
                               shuffle=True, num_epochs=num_epochs, seed=seed)
  ops = [*transforms, FormatRecord(tuple(keys)),
         grain.Batch(batch_size=local, drop_remainder=drop_remainder)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count, shard_options=shard_options,
                          read_options=read_options)


class PaddedSource:
  """`source` padded to a multiple of `multiple` records; adds 'mask' (False on padding).

  Padding records repeat record 0 (so shapes match) with label -1.
  """

  def __init__(self, source, multiple: int):
    if len(source) == 0:
      raise ValueError("the evaluation source is empty; check the dataset split")
    self._source = source
    self._n = len(source)
    self._len = -(-self._n // multiple) * multiple

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Record:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} records")
    if index < self._n:
      return {**self._source[index], "mask": True}
    return {**self._source[0], "label": -1, "mask": False}

  def __repr__(self) -> str:
    return f"PaddedSource({self._source!r}, len={self._len})"


def make_eval_loader(source, *, global_batch_size: int, transforms: Sequence[Any] = (),
                     worker_count: int = 0, keys: Sequence[str] = DEFAULT_KEYS,
                     shard_options: Optional[grain.ShardOptions] = None,
                     read_options: Optional[grain.ReadOptions] = None) -> grain.DataLoader:
  """One epoch in order, every record once; batches carry 'mask' (bool (B,)).

  The source is padded to whole global batches, so each process yields the same number of
  full batches; drop the masked-out rows when reducing.
  """
  _check_workers(worker_count)
  shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
  local = _local_batch(global_batch_size, shard_options)
  padded = PaddedSource(source, global_batch_size)
  sampler = grain.IndexSampler(num_records=len(padded), shard_options=shard_options,
                               shuffle=False, num_epochs=1, seed=0)
  keys = tuple(keys) + (() if "mask" in keys else ("mask",))
  ops = [*transforms, FormatRecord(keys), grain.Batch(batch_size=local, drop_remainder=False)]
  return grain.DataLoader(data_source=padded, sampler=sampler, operations=ops,
                          worker_count=worker_count, shard_options=shard_options,
                          read_options=read_options)


def batch_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over `axis` of the mesh, the rest replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def to_global(batch: Record, sharding: jax.sharding.Sharding) -> Record:
  """Per-process numpy batch -> global jax.Arrays (batch axis = all processes' rows)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


class DevicePrefetchIterator:
  """Keeps `size` batches on device ahead of the consumer.

  `get_state()` is the wrapped iterator's state after the last batch handed out (not after
  the ones still queued), so a checkpoint resumes at exactly the next batch; `set_state()`
  drops the queue. It quacks like a grain iterator for `PyGrainCheckpointSave/Restore`.
  """

  def __init__(self, iterator: Iterator[Record], size: int,
               sharding: jax.sharding.Sharding):
    if size < 1:
      raise ValueError(f"prefetch size={size} must be >= 1")
    self._it = iterator
    self._size = size
    self._sharding = sharding
    self._queue: collections.deque = collections.deque()
    self._stateful = hasattr(iterator, "get_state")
    self._state = iterator.get_state() if self._stateful else None

  def __iter__(self) -> "DevicePrefetchIterator":
    return self

  def __next__(self) -> Record:
    while len(self._queue) < self._size:
      try:
        batch = next(self._it)
      except StopIteration:
        break
      state = self._it.get_state() if self._stateful else None
      # A worker's batch lives in shared memory, unlinked when its array is freed; on CPU the
      # device array may share that memory and outlive the run, so the resource tracker warns
      # of leaked shared memory at exit. Copied out, it is freed here.
      batch = jax.tree.map(lambda v: np.array(v) if type(v) is not np.ndarray else v, batch)
      self._queue.append((to_global(batch, self._sharding), state))
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self):
    if not self._stateful:
      raise TypeError("the wrapped iterator has no get_state(); it cannot be checkpointed")
    return self._state

  def set_state(self, state) -> None:
    self._queue.clear()
    self._it.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()

  def close(self) -> None:
    """Drop the queue and stop grain's workers now (idempotent). A stop in mid-run otherwise
    leaves the workers' prefetched batches in shared memory for the resource tracker to warn
    about at exit. grain's `DataLoaderIterator` has no close() of its own: its dataset
    iterator does (`DatasetIterator.close`)."""
    self._queue.clear()
    close = getattr(self._it, "close", None) or getattr(getattr(self._it, "_iterator", None),
                                                        "close", None)
    if close is not None:
      close()


def prefetch_to_device(iterator: Iterator[Record], size: int,
                       sharding: jax.sharding.Sharding) -> DevicePrefetchIterator:
  """Global, sharded device batches from a per-process iterator (e.g. `iter(loader)`)."""
  return DevicePrefetchIterator(iterator, size, sharding)
