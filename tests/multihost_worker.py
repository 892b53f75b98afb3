"""Subprocess worker for tests/test_sharding.py and tests/test_multihost.py.

JAX fixes its device count (and its process group) when it starts, so each layout runs in
a fresh process:

  python tests/multihost_worker.py equiv --out R.json
      one process, 4 CPU devices: 3 student steps on a 1-device and a 4-device mesh
      (A-SKD, AT), with the state-sharding switch, and in bfloat16; numbers to R.json.
  python tests/multihost_worker.py train --devices D [--num-processes N --process-id I]
      the real train loop (`train_stage`) on a tiny synthetic face task; final params to
      --dump (npz, process 0), per-step metrics to --workdir/metrics_<process>.jsonl.

Everything is tiny (iResNet-CBAM width 0.125, one block per stage, 32 px, 16 identities).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time


def _set_devices(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


IMAGE = 32
CLASSES = 16
PER_CLASS = 4
GLOBAL_BATCH = 8
LR_SIZE = 8


def tiny_config(method: str = "askd", **train_overrides):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from configs.facerec import get_config
  c = get_config("demo")
  c.data.image_size = IMAGE
  c.data.augment = "none"
  c.model.width = 0.125
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.embedding_dim = 32
  c.model.dropout = 0.2
  c.train.batch_size = GLOBAL_BATCH
  c.train.steps = 3
  c.train.lr = 0.002  # larger steps amplify float32 reduction-order noise past 1e-5 (AT)
  c.train.lr_boundaries = ()
  c.train.log_every = 1
  c.train.checkpoint_every = 0
  c.student.sizes = (LR_SIZE,)
  c.student.methods = (method,)
  c.jax_cache_dir = ""
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def synthetic_records():
  """16 identities x 4 images: a per-identity pattern plus noise (learnable, deterministic)."""
  import numpy as np
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (CLASSES, IMAGE, IMAGE, 3))
  out = []
  for i in range(CLASSES * PER_CLASS):
    c = i % CLASSES
    img = np.clip(base[c] + rng.normal(0, 24, base[c].shape), 0, 255).astype(np.uint8)
    out.append({"image": img, "label": c})
  return out


class _VirtualShards:
  """n per-process loaders (ShardOptions(i, n)) read in one process, batches concatenated in
  process order: the global batch a run with n processes assembles."""

  def __init__(self, loaders):
    self._its = [iter(l) for l in loaders]

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return json.dumps([it.get_state().decode() for it in self._its])

  def set_state(self, state):
    for it, s in zip(self._its, json.loads(state)):
      it.set_state(s.encode())


def make_task(cfg, virtual_shards: int = 0):
  from askd_jax.tasks.facerec import FaceRecTask

  class SyntheticFaceTask(FaceRecTask):
    """The face task on in-memory records (the loader and model code are the package's)."""

    @property
    def data(self):
      if self._data is None:
        self._data = {"train": synthetic_records(), "num_classes": CLASSES, "verification": []}
      return self._data

    def train_loader(self, global_batch, seed):
      if not virtual_shards:
        return super().train_loader(global_batch, seed)
      import grain.python as grain
      from askd_jax.data import pipeline
      loaders = [pipeline.make_train_loader(
          self.data["train"], global_batch_size=global_batch, seed=seed,
          shard_options=grain.ShardOptions(i, virtual_shards, drop_remainder=True))
          for i in range(virtual_shards)]

      class _Loader:
        def __iter__(self_inner):
          return _VirtualShards(loaders)
      return _Loader()

  return SyntheticFaceTask(cfg)


def init_teacher(task, seed: int = 1):
  import jax
  model = task.model()
  sample = task.sample_batch(2)
  v = jax.jit(lambda k: model.init({"params": k, "dropout": k}, task.preprocess(sample),
                                   sample["label"], train=True))(jax.random.key(seed))
  return {"params": v["params"], "batch_stats": v["batch_stats"]}


def _axes(spec) -> list:
  axes = [a if a is None or isinstance(a, str) else list(a) for a in spec]
  while axes and axes[-1] is None:
    axes.pop()
  return axes


def flat(tree):
  import jax
  import numpy as np
  return {jax.tree_util.keystr(p): np.asarray(x, np.float32)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rel_diff(a, b) -> dict:
  """How far parameter trees a and b are apart, per leaf, relative to the leaf's scale.

  'rel': largest max|a - b| / max(max|b|, 0.01) over leaves (the floor covers biases right
  before a BatchNorm: their gradient is exactly zero, they hold ~1e-8 of rounding noise);
  'l2': largest ||a - b|| / ||b|| over leaves with ||b|| > 0.01; 'worst': the leaf of 'rel'."""
  import numpy as np
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  rel = {k: float(np.abs(a[k] - b[k]).max() / max(float(np.abs(b[k]).max()), 0.01)) for k in a}
  worst = max(rel, key=rel.get)
  return {"rel": rel[worst], "worst": worst,
          "l2": max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in a
                    if np.linalg.norm(b[k]) > 0.01),
          "finite": all(bool(np.isfinite(a[k]).all()) for k in a)}


# --- equiv: one process, 1 vs 4 devices --------------------------------------------------------

def run_equiv(out_path: str) -> None:
  _set_devices(4)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from askd_jax import distill as distill_lib
  from askd_jax.data import degrade as degrade_lib
  from askd_jax.train import sharding as shd
  from askd_jax.train.loop import student_degrade_cfg
  from askd_jax.train.optim import sgd_torch
  from askd_jax.train.step import init_state, make_train_step

  assert jax.device_count() == 4, jax.devices()
  cfg = tiny_config()
  task = make_task(cfg)
  teacher_model = task.model()
  teacher_vars = init_teacher(task)
  recs = synthetic_records()
  order = np.random.default_rng(1).permutation(len(recs))
  batches = [{"image": np.stack([recs[i]["image"] for i in idx]),
              "label": np.asarray([recs[i]["label"] for i in idx], np.int32)}
             for idx in np.split(order[:3 * GLOBAL_BATCH], 3)]
  tx = sgd_torch(cfg.train.lr, 0.9, 5e-4, True)
  degrade_fn = degrade_lib.make_degrade(student_degrade_cfg(cfg.student, (LR_SIZE,)))

  def fresh_state(model):
    sample = task.sample_batch(2)
    v = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                   task.preprocess(sample), sample["label"], train=True)
    return init_state(v["params"], v["batch_stats"], tx, jax.random.key(2))

  state0 = jax.device_get(fresh_state(task.model()))  # host copy: each run donates its own

  def prepare(n_dev: int, method: str, dtype=jnp.float32, shard_min: int = 0):
    """Lower the step for one layout (compiled later, several at once)."""
    mesh = shd.make_mesh(jax.devices()[:n_dev])
    model = task.model(dtype=dtype)
    state_sh = shd.state_shardings(state0, mesh, shard_min)
    step = make_train_step(task=task, model=model, tx=tx, cpu_ops=model.backbone.cpu_ops,
                           teacher_model=teacher_model,
                           distill_fn=distill_lib.get(method), distill_cfg=cfg.distill[method],
                           degrade_fn=degrade_fn)
    absd = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), t)
    lowered = shd.jit_train_step(step, mesh, state_sh).lower(absd(state0), absd(teacher_vars),
                                                             absd(batches[0]))
    return {"mesh": mesh, "state_sh": state_sh, "lowered": lowered,
            "name": f"{method} {n_dev} dev {jnp.dtype(dtype).name} shard_min={shard_min}"}

  def run(job):
    mesh, state_sh, jstep = job["mesh"], job["state_sh"], job["compiled"]
    state = jax.device_put(state0, state_sh)
    tv = jax.device_put(teacher_vars, shd.replicated(mesh))
    losses, distill = [], []
    for b in batches:
      state, m = jstep(state, tv, shd.global_batch(b, shd.batch_sharding(mesh)))
      losses.append(float(m["loss"]))
      distill.append(float(m["distill_loss"]))
    p0, p1 = flat(state0.params), flat(state.params)
    res = {"losses": losses, "distill": distill,
           "moved": rel_diff(p1, p0)["l2"],  # how far 3 steps took the parameters
           "n_devices_used": len({d for x in jax.tree.leaves(state.params)
                                  for d in x.sharding.device_set}),
           "sharded": shd.describe(state),
           # the mesh axis of each array axis, trailing unsplit axes dropped (JSON-able;
           # PartitionSpec's repr is not stable across JAX versions)
           "margin_spec": _axes(state.params["head"]["kernel"].sharding.spec),
           "margin_shard_shapes": sorted({tuple(s.data.shape) for s in
                                          state.params["head"]["kernel"].addressable_shards}),
           "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
           "opt_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_state)
                                 if jnp.issubdtype(x.dtype, jnp.floating)}),
           "stats_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.batch_stats)}),
           "metric_dtypes": sorted({str(v.dtype) for v in m.values()})}
    return res, flat(state.params), flat(state.batch_stats)

  jobs = {"askd1": prepare(1, "askd"), "askd4": prepare(4, "askd"),
          "at1": prepare(1, "at"), "at4": prepare(4, "at"),
          # the sharding switch: leaves >= 256 elements (margin weight (16, 32), momentum, convs)
          "sharded": prepare(4, "askd", shard_min=256),
          "bf16": prepare(4, "askd", dtype=jnp.bfloat16)}
  # XLA compiles outside the GIL: one thread per core.
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 1)) as pool:
    for job, compiled in zip(jobs.values(), pool.map(lambda j: j["lowered"].compile(),
                                                     jobs.values())):
      job["compiled"] = compiled
  print(f"compiled {len(jobs)} steps in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
  out = {k: run(j) for k, j in jobs.items()}
  results = {}
  for method in ("askd", "at"):
    (r1, p1, s1), (r4, p4, s4) = out[method + "1"], out[method + "4"]
    results[method] = {"one": r1, "four": r4, "params": rel_diff(p4, p1),
                       "stats": rel_diff(s4, s1)}
  rs, ps, ss = out["sharded"]
  results["sharded"] = {"run": rs, "params": rel_diff(ps, out["askd1"][1]),
                        "stats": rel_diff(ss, out["askd1"][2])}
  rb, pb, _ = out["bf16"]
  results["bf16"] = {"run": rb, "params": rel_diff(pb, out["askd1"][1])}

  # The mixed-precision policy, read off one bfloat16 forward pass.
  model = task.model(dtype=jnp.bfloat16)
  x = task.preprocess(batches[0])
  (outs, feats), upd = jax.eval_shape(lambda v, x, y: model.apply(
      v, x, y, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]),
      {"params": state0.params, "batch_stats": state0.batch_stats}, x, batches[0]["label"])
  results["policy"] = {
      "logits": str(outs["logits"].dtype), "embedding": str(outs["embedding"].dtype),
      "channel_maps": sorted({str(a.dtype) for a in feats.channel_maps}),
      "spatial_maps": sorted({str(a.dtype) for a in feats.spatial_maps}),
      "stages": sorted({str(a.dtype) for a in feats.stages}),
      "new_stats": sorted({str(a.dtype) for a in jax.tree.leaves(upd["batch_stats"])})}
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


# --- train: the real loop, one or several processes ---------------------------------------------

class _FileWriter:
  """Stands in for TensorBoard: records which process writes what."""

  def __init__(self, path):
    self._f = open(path, "a")

  def add_scalar(self, tag, value, step):
    self._f.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


def _signal_at_step(n: int) -> None:
  """SIGTERM to this process as soon as step n - 1 has ended (the loop's "step" notification,
  after that step's stop check), so that the signal is pending while step n runs and the
  loop's check after step n sees it: the signal arrives during step n, whatever the input
  pipeline has read ahead."""
  import signal
  from askd_jax import stop
  if n < 2:
    raise SystemExit("--sigterm-at-step needs N >= 2 (the signal is sent when step N-1 ends)")

  def listener(phase, detail):
    if phase == "step" and detail.split()[-1] == str(n - 1):
      os.kill(os.getpid(), signal.SIGTERM)
  stop.listeners.append(listener)


def run_train(a) -> None:
  _set_devices(a.devices)
  if a.num_processes > 1:
    os.environ["JAX_COORDINATOR_ADDRESS"] = f"localhost:{a.port}"
    os.environ["JAX_NUM_PROCESSES"] = str(a.num_processes)
    os.environ["JAX_PROCESS_ID"] = str(a.process_id)
  import jax
  import numpy as np
  from askd_jax.train import sharding as shd
  from askd_jax.runtime import tune_cpu
  assert tune_cpu()["sync_dispatch"]  # as askd_jax.main runs: first, then distributed
  if a.num_processes > 1:
    shd.initialize_distributed(initialization_timeout=300)
  from askd_jax.train import checkpoint as ckpt_lib
  from askd_jax.train import loop, state_io
  assert jax.process_count() == a.num_processes and jax.device_count() == a.devices * a.num_processes
  cfg = tiny_config(steps=a.steps)
  cfg.shard_params_min_size = a.shard_min
  task = make_task(cfg, a.virtual_shards)
  if a.make_teacher:
    ckpt_lib.export_model(a.teacher, jax.device_get(init_teacher(task)), task.spec())
  stage = loop.Stage("student", "student", "askd", (LR_SIZE,), a.teacher)
  pid = jax.process_index()
  ckdir = os.path.join(a.workdir, "student", "checkpoints")
  # Restored with a target on this run's devices: whatever layout wrote the step.
  final_params = lambda step: flat(shd.to_host(
      shd.restore_replicated(os.path.join(ckdir, str(step), "state"))["params"]))
  out = {"process": pid}
  if a.check_restore:  # the checkpoint restores bit for bit before the run continues
    saved = np.load(a.check_restore)
    mgr = state_io.manager(ckdir, read_only=True)
    out["restored_step"] = int(mgr.latest_step())
    params = final_params(out["restored_step"])
    out["restored_max_abs_diff"] = max(float(np.abs(params[k] - saved[k]).max()) for k in saved.files)
  writer = lambda name: _FileWriter(os.path.join(a.workdir, f"tb_process{pid}.jsonl"))
  if a.sigterm_at_step:  # a stop signal reaching this process only, during step N
    _signal_at_step(a.sigterm_at_step)
  if a.check_restore:
    # The continuation extends the finished 3-step stage to 5 steps on purpose: a config
    # change that loop.check_stage_config refuses for users (train.steps is in the stage's
    # config hash). What this run tests is the restore across process/device layouts.
    loop.check_stage_config = lambda stage_dir, want, config=None: None
  try:
    loop.train_stage(cfg, task, stage, a.workdir, progress=False, writer_factory=writer)
  except loop.Preempted as e:
    out["preempted"] = str(e)
  mgr = state_io.manager(ckdir, read_only=True)
  out["final_step"] = int(mgr.latest_step())
  out["steps_saved"] = sorted(int(s) for s in mgr.all_steps())
  params = final_params(out["final_step"])
  if pid == 0 and a.dump:
    np.savez(a.dump, **params)
  with open(os.path.join(a.workdir, f"result_process{pid}.json"), "w") as f:
    json.dump(out, f)


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=("equiv", "train"))
  p.add_argument("--out")
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--workdir")
  p.add_argument("--teacher")
  p.add_argument("--make-teacher", action="store_true")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--shard-min", type=int, default=0)
  p.add_argument("--virtual-shards", type=int, default=0)
  p.add_argument("--dump")
  p.add_argument("--check-restore")
  p.add_argument("--sigterm-at-step", type=int, default=0)
  a = p.parse_args(argv)
  if a.mode == "equiv":
    run_equiv(a.out)
  else:
    run_train(a)


if __name__ == "__main__":
  main()
