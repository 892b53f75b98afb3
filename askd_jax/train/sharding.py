"""One device mesh for every platform: the batch is split on a 'data' axis.

The same code runs on 1 CPU, 8 GPUs, several hosts and TPU pods: a `Mesh` whose 'data'
axis spans every device of every process, one `jax.jit` with shardings, and XLA inserts
the collectives. BatchNorm statistics are therefore over the global batch, exactly as on
one device (tests/test_sharding.py, tests/test_multihost.py check it to 1e-5).

Parameters and optimizer state are replicated; with `state_shardings(..., shard_min_size)`
every leaf at least that large (the margin weight (classes, D) and its momentum, for data
sets with many identities) is split over the devices instead.

Several processes (hosts): `initialize_distributed()` before any JAX computation; each
process reads its own shard of the data (grain `ShardByJaxProcess`) and `global_batch`
assembles the per-process batches into one global array. The input iterator's position
is per process, so `gather_iterator_states` / `local_iterator_state` carry every
process's position through a checkpoint (orbax writes JSON from process 0 only).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, List, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from askd_jax.train.step import compiler_options

log = logging.getLogger(__name__)

DATA = "data"
_STATES_KEY = "askd_jax_process_iterator_states"


# --- mesh and shardings ----------------------------------------------------------------------

def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_axis(shape: Sequence[int], n: int) -> Optional[int]:
  """The axis to split a leaf over n devices: axis 0 if n divides it, else the largest
  axis n divides, else None. (A margin weight of 10572 identities cannot be split 8 ways
  on its class axis; its embedding axis of 512 can.)"""
  if not shape:
    return None
  if shape[0] % n == 0:
    return 0
  fits = [i for i, d in enumerate(shape) if d % n == 0]
  return max(fits, key=lambda i: shape[i]) if fits else None


def state_shardings(state: Any, mesh: Mesh, shard_min_size: int = 0) -> Any:
  """Shardings for a state pytree (arrays or ShapeDtypeStructs): all replicated, or with
  shard_min_size > 0 every leaf of at least that many elements split over 'data' (see
  `shard_axis`). Optimizer leaves mirror the parameters, so the margin weight and its
  momentum are split the same way; XLA gathers what the forward pass needs."""
  n = mesh.devices.size

  def pick(x):
    shape = tuple(getattr(x, "shape", ()))
    if shard_min_size > 0 and n > 1 and shape and int(np.prod(shape)) >= shard_min_size:
      axis = shard_axis(shape, n)
      if axis is not None:
        return NamedSharding(mesh, P(*([None] * axis + [DATA])))
    return NamedSharding(mesh, P())

  return jax.tree.map(pick, state)


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """Per-process numpy batch (B / processes rows) -> one global jax.Array per leaf.

  Rows of process p land on p's devices, in process order, so the global batch is the
  concatenation of the processes' batches."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def jit_train_step(step_fn: Callable, mesh: Mesh, state_sh: Any, donate: bool = True) -> Callable:
  """jit `step(state, teacher_vars, batch) -> (state, metrics)` over the mesh: state as
  `state_sh`, teacher replicated, batch split on 'data', metrics replicated.

  With several processes the first call compiles, then waits for every process to have
  compiled before running: hosts compile at different speeds (or one hits the compilation
  cache), and the first collective must not wait on a slow compiler (gloo gives up after
  30 s)."""
  repl = replicated(mesh)
  opts = compiler_options(mesh.devices.flat[0].platform)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, repl, batch_sharding(mesh)),
                   out_shardings=(state_sh, repl), donate_argnums=(0,) if donate else (),
                   compiler_options=opts or None)
  if jax.process_count() == 1:
    return jitted
  compiled = []

  def step(*args):
    if not compiled:
      compiled.append(jitted.lower(*args).compile())
      barrier("train step compiled")
    return compiled[0](*args)

  return step


def any_process(flag: bool) -> bool:
  """Whether `flag` is set in any process (a collective: every process must call it at the
  same point). With one process, `flag` itself."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


_BARRIERS = [0]


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Wait until every process gets here (through the coordination service, not a device
  collective, so a long wait is fine). No-op in one process."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize made
  _BARRIERS[0] += 1  # every process calls barriers in the same order
  distributed.global_state.client.wait_at_barrier(f"askd_jax/{_BARRIERS[0]}/{name}",
                                                  timeout_in_ms=timeout_s * 1000)


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathers sharded leaves across hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return jax.tree.map(
      lambda x: np.asarray(x) if getattr(x, "is_fully_replicated", True)
      else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def restore_replicated(path: str, mesh: Optional[Mesh] = None) -> Any:
  """An orbax PyTree item (a step's `state` dir, an exported `variables` dir) restored
  replicated on this run's mesh, whatever process/device layout wrote it.

  Orbax refuses a restore without a target across topologies ("Topology mismatch"): the
  target is built here from the item's own metadata (shapes, dtypes)."""
  import orbax.checkpoint as ocp
  mesh = mesh or make_mesh()
  ckptr = ocp.StandardCheckpointer()
  md = ckptr.metadata(path)
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated(mesh)), tree)
  return ckptr.restore(path, target)


# --- several processes -------------------------------------------------------------------------

def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **kwargs) -> None:
  """`jax.distributed.initialize` from arguments, else the environment, else auto-detection.

  Environment: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any
  launcher); without them JAX detects SLURM, Open MPI, Kubernetes and Cloud TPU pods itself.
  Processes other than 0 log only warnings, so one process speaks for the run.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = _env_int("JAX_PROCESS_ID")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  log.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int:
  v = os.environ[name]
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r} must be an integer") from None


# --- the input position of every process through a checkpoint ----------------------------------

def gather_iterator_states(local: Union[bytes, str, None]) -> Optional[str]:
  """What to checkpoint for the data iterators. One process: its state unchanged.
  Several: a JSON list of every process's state (a collective: call on all processes)."""
  if local is None:
    return None
  text = local.decode() if isinstance(local, bytes) else str(local)
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  raw = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  buf = np.zeros(int(lengths.max()), np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf))  # (processes, max length)
  states = [bytes(rows[p, :int(lengths[p])]).decode() for p in range(len(lengths))]
  return json.dumps({_STATES_KEY: states})


def local_iterator_state(saved: Union[bytes, str, None], fresh: Union[bytes, str],
                         consumed: int) -> Optional[bytes]:
  """This process's iterator state from a checkpoint written by `gather_iterator_states`.

  `fresh` is a new iterator's state, `consumed` the records this process would have read
  by the checkpoint's step (step * global batch / processes). If the checkpoint was
  written by another number of processes, positions cannot be mapped record for record;
  the stream restarts at the same offset in its (new) order, or, when grain's state is
  not the simple one-reader kind, at its start. Either way a warning says so.
  """
  if saved is None:
    return None
  text = saved.decode() if isinstance(saved, bytes) else str(saved)
  try:
    doc = json.loads(text)
  except json.JSONDecodeError:
    return text.encode()  # not ours to interpret: hand it to the iterator as before
  states = doc.get(_STATES_KEY) if isinstance(doc, dict) else None
  n_saved = len(states) if states is not None else 1
  if n_saved == jax.process_count():
    return (states[jax.process_index()] if states is not None else text).encode()
  return _reposition(fresh, consumed, n_saved)


def _reposition(fresh: Union[bytes, str], consumed: int, n_saved: int) -> Optional[bytes]:
  what = (f"the checkpoint was written by {n_saved} process(es), this run has "
          f"{jax.process_count()}")
  state = json.loads(fresh.decode() if isinstance(fresh, bytes) else fresh)
  seen = state.get("last_seen_indices")
  if state.get("worker_count") == 0 and isinstance(seen, dict) and set(seen) == {"0"}:
    # grain with no worker processes: last_seen = shard_index - shards + next * shards.
    state["last_seen_indices"] = {"0": int(seen["0"]) + int(consumed) * jax.process_count()}
    log.warning("%s: the input stream resumes at the same offset (%d records per process) "
                "in this layout's order, not record for record", what, consumed)
    return json.dumps(state).encode()
  log.warning("%s: the input stream restarts from its beginning (set data.workers=0 to keep "
              "the offset)", what)
  return None


def describe(tree: Any) -> List[str]:
  """'path: shape spec' of every leaf split over devices (for logs and tests)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sh = getattr(x, "sharding", None)
    spec = getattr(sh, "spec", None)
    if spec is not None and any(s is not None for s in spec):
      out.append(f"{jax.tree_util.keystr(path)}: {tuple(x.shape)} {spec}")
  return out
