"""Training-step throughput: the JAX teacher and A-SKD student steps beside PyTorch.

    python -m askd_jax.tools.bench --depth=50 --width=1.0 --size=112 --batch=8,32 \\
        --dtype=float32 --steps=5 --torch=eager,compile --out=docs/benchmarks.md

JAX side: the project's own `make_train_step` (the real A-SKD loss, the official on-device
degradation, `sgd_torch`), jitted with the state donated, as the train loop runs it.
PyTorch side (`--torch`, optional): the reference model of `askd_jax.tools.torch_reference`,
`torch.optim.SGD(nesterov=True)`, ArcFace cross-entropy, the A-SKD loss against the frozen
eval-mode teacher's maps and the official degradation computed on the fly. Variants:
`eager` (NCHW), `channels_last` (eager, channels_last tensors) and `compile`
(torch.compile of the models, channels_last); on a GPU torch runs under AMP bfloat16
autocast when --dtype=bfloat16.

Timing: synthetic batches (no data set); compilation (JAX lower+compile, torch.compile's
first call) is reported apart; one warm-up step is excluded; then `--steps` rounds in which
every implementation runs one step in turn (interleaved, so a machine whose load changes
affects them alike; `--schedule=blocked`: each implementation's steps back to back, as in
training) and the median step time is reported. MFU uses the FLOPs XLA counts
for the compiled JAX step (`cost_analysis()`), the same count for every implementation.
The process first applies `askd_jax.runtime.tune_cpu()`, as `askd_jax.main` does
(`--tune_cpu=0` skips it); its allocator settings are process-wide, so the PyTorch steps
run under them too.

Importable without ml_collections and tensorflow_datasets (the GPU machine has neither).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

try:
  import resource  # Unix: page-fault counts per step
except ImportError:  # pragma: no cover
  resource = None

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax import distill as distill_lib
from askd_jax import ops
from askd_jax.data import degrade as degrade_lib
from askd_jax.models import ArcFace, MarginModel, iresnet_cbam
from askd_jax.runtime import tune_cpu
from askd_jax.tools import step_profile
from askd_jax.tasks.base import Task
from askd_jax.train.optim import sgd_torch
from askd_jax.train.step import compiler_options, init_state, make_train_step

# Dense peak FLOP/s per device kind (vendor data sheets, SXM parts). fp32 is the plain
# (non-tensor-core) rate; JAX and torch may use TF32 for float32 matmuls on GPUs.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
TORCH_VARIANTS = ("eager", "channels_last", "compile")


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak FLOP/s of a device kind and dtype, None when unknown (CPUs)."""
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def _stage_sizes(spec: str) -> Optional[tuple]:
  return tuple(int(s) for s in spec.split(",")) if spec else None


# ---------------------------------------------------------------------------------------
# JAX


class BenchTask(Task):
  """The face-recognition glue of Task (preprocess, forward, ArcFace CE), no data set."""
  name = "bench"


def _jax_models(args, dtype):
  backbone = lambda: iresnet_cbam(args.depth, args.width, _stage_sizes(args.stage_sizes),
                                  embedding_dim=args.embedding_dim, dtype=dtype,
                                  cpu_ops=ops.on_cpu())  # JAX's default backend, as the step
  model = MarginModel(backbone(), ArcFace(num_classes=args.classes))
  return model


def _batch(args, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8),
          "label": rng.integers(0, args.classes, (batch,), dtype=np.int32)}


def _init_fn(model, args):
  """key -> the model's variables (one 1-image dummy batch)."""
  x = jnp.zeros((1, args.size, args.size, 3), jnp.float32)
  y = jnp.zeros((1,), jnp.int32)
  return lambda k: model.init({"params": k, "dropout": k}, x, y, train=False)


def _jax_init(model, args, seed: int):
  return jax.jit(_init_fn(model, args))(jax.random.key(seed))


def _step_fn(args, kind: str, model, tx):
  """The project's train step for `kind` ('teacher' or 'askd'), as the train loop builds it."""
  task = BenchTask(cfg=None)
  if kind == "teacher":
    return make_train_step(task=task, model=model, tx=tx, cpu_ops=ops.on_cpu())
  if kind == "askd":
    sizes = tuple(int(s) for s in args.lr_sizes.split(","))
    return make_train_step(task=task, model=model, tx=tx, cpu_ops=ops.on_cpu(),
                           teacher_model=model,
                           distill_fn=distill_lib.get("askd"), distill_cfg={"weight": 5.0},
                           degrade_fn=degrade_lib.make_degrade({"sizes": sizes}))
  raise ValueError(f"--steps_kind has {kind!r}; use teacher and/or askd")


def _dtype(args):
  return jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32


def jax_step_fns(args, batch: int) -> Dict[str, Dict[str, Any]]:
  """{'teacher'|'askd': {'fn': jittable step, 'args': (state, teacher_vars, batch)}}."""
  model = _jax_models(args, _dtype(args))
  tx = sgd_torch(LR, MOMENTUM, WD)
  out = {}
  data = _batch(args, batch)
  for kind in args.steps_kind.split(","):
    fn = _step_fn(args, kind, model, tx)
    variables = _jax_init(model, args, seed=1)
    state = init_state(variables["params"], variables["batch_stats"], tx, jax.random.key(0))
    tvars = _jax_init(model, args, seed=2) if kind == "askd" else None
    out[kind] = {"fn": fn, "args": (state, tvars, jax.device_put(data))}
  return out


def compile_step(fn, args, tuned: bool = True):
  """(compiled, wall s, CPU s): the jitted step, state donated, as the loop runs it.

  tuned: with `askd_jax.train.step.compiler_options()` (else XLA's defaults).
  """
  t, c = time.perf_counter(), time.process_time()
  opts = compiler_options() if tuned else {}
  compiled = jax.jit(fn, donate_argnums=(0,), compiler_options=opts or None).lower(*args).compile()
  return compiled, time.perf_counter() - t, time.process_time() - c


def cost_flops(compiled) -> Optional[float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def peak_bytes(compiled) -> Optional[int]:
  """Arguments + outputs + temporaries - donated aliases, from XLA's memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def memory_report(args, batch: int, known: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
  """Peak bytes of the compiled A-SKD step at `batch` and batch // 2 (abstract arguments:
  nothing is allocated), and the largest batch a linear fit puts under 80 GB.

  known: {batch: peak bytes} of steps already compiled with the same options (the timed
  ones); only the missing batches are compiled. On a GPU those are compiled without
  autotuning (the buffers are the same; only the convolutions' scratch space can differ).
  """
  sizes = dict((known or {}).items())
  model = _jax_models(args, _dtype(args))
  tx = sgd_torch(LR, MOMENTUM, WD)
  fn = _step_fn(args, "askd", model, tx)
  # Shapes only (nothing is initialised or allocated): eval_shape of init and init_state.
  tvars = jax.eval_shape(_init_fn(model, args), jax.random.key(2))
  state = jax.eval_shape(lambda v, k: init_state(v["params"], v["batch_stats"], tx, k),
                         tvars, jax.random.key(0))
  opts = dict(compiler_options())
  if jax.default_backend() == "gpu":
    opts["xla_gpu_autotune_level"] = 0
  for b in (batch // 2, batch):
    if sizes.get(b) is not None:
      continue
    abstract_batch = {"image": jax.ShapeDtypeStruct((b, args.size, args.size, 3), jnp.uint8),
                      "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    compiled = jax.jit(fn, donate_argnums=(0,), compiler_options=opts or None).lower(
        state, tvars, abstract_batch).compile()
    sizes[b] = peak_bytes(compiled)
    _progress(f"memory: A-SKD step at batch {b}: {sizes[b]} bytes")
  return {"batch": batch, "peak_bytes": sizes[batch], "peak_bytes_half": sizes[batch // 2],
          **fit_max_batch({b: sizes[b] for b in (batch // 2, batch)})}


def fit_max_batch(sizes: Dict[int, Optional[int]], budget: float = 80e9) -> Dict[str, Any]:
  """Linear fit bytes = fixed + per_image * batch through two batches; the largest batch
  whose peak stays under `budget` (activations grow linearly with the batch)."""
  (b1, m1), (b2, m2) = sorted(sizes.items())
  if m1 is None or m2 is None or b1 == b2:
    return {"bytes_per_image": None, "max_batch_80gb": None}
  per_img = (m2 - m1) / (b2 - b1)
  fixed = m2 - per_img * b2
  return {"bytes_per_image": per_img,
          "max_batch_80gb": int((budget - fixed) // per_img) if per_img > 0 else None}


def jax_runner(compiled, args):
  """A closure running one step (the state is donated: it is threaded through)."""
  holder = {"state": args[0]}
  rest = args[1:]

  def run():
    holder["state"], metrics = compiled(holder["state"], *rest)
    jax.block_until_ready((holder["state"], metrics))
    return metrics

  return run


# ---------------------------------------------------------------------------------------
# PyTorch


def torch_runners(args, batch: int, variant: str) -> Dict[str, Callable[[], Any]]:
  """{'teacher'|'askd': one-step closure} for the PyTorch reference, variant of TORCH_VARIANTS."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from askd_jax.tools import torch_reference as tr  # pylint: disable=g-import-not-at-top

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if dev.type == "cuda":  # as JAX autotunes its convolutions when it compiles the step
    torch.backends.cudnn.benchmark = True
  amp = args.dtype == "bfloat16" and dev.type == "cuda"
  fmt = torch.channels_last if variant in ("channels_last", "compile") else torch.contiguous_format
  sizes = [int(s) for s in args.lr_sizes.split(",")]
  kernel = _torch_blur_kernel(torch).to(dev)
  data = _batch(args, batch)
  images = torch.from_numpy(data["image"]).to(dev)
  labels = torch.from_numpy(data["label"]).long().to(dev)

  def build(seed):
    torch.manual_seed(seed)
    # The reference only uses input_size for the size of its last feature map (and asks
    # for a multiple of 16); give it the multiple of 16 with the same last map (56 -> 4).
    net = tr.iresnet_cbam(args.depth, args.width, _stage_sizes(args.stage_sizes),
                          input_size=16 * _final_hw(args.size), embedding_dim=args.embedding_dim)
    return net.to(dev).to(memory_format=fmt)

  def preprocess():  # uint8 NHWC -> [-1, 1] NCHW in the variant's memory format
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(memory_format=fmt)

  def degrade(x):  # official: nearest S -> s -> S (one size per sample), fixed 5x5 blur
    if len(sizes) == 1:
      choice = torch.zeros(x.shape[0], dtype=torch.long, device=dev)
    else:
      choice = torch.randint(len(sizes), (x.shape[0],), device=dev)
    out = torch.empty_like(x)
    for i, s in enumerate(sizes):
      idx = (choice == i).nonzero()[:, 0]
      if len(idx):
        small = F.interpolate(x[idx], size=(s, s), mode="nearest")
        out[idx] = F.interpolate(small, size=x.shape[2:], mode="nearest")
    c = x.shape[1]
    out = F.pad(out, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(out, kernel.expand(c, 1, 5, 5), groups=c).contiguous(memory_format=fmt)

  def askd(sf, tf):
    terms = [(1.0 - F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1)).mean()
             for s, t in zip(sf.channel_maps + sf.spatial_maps, tf.channel_maps + tf.spatial_maps)]
    return 5.0 * torch.stack(terms).sum()

  runners = {}
  for kind in args.steps_kind.split(","):
    net = build(1).train()
    head = tr.ArcMarginProduct(args.embedding_dim, args.classes).to(dev).train()
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=LR,
                          momentum=MOMENTUM, weight_decay=WD, nesterov=True)
    fwd = torch.compile(net) if variant == "compile" else net
    teacher = tfwd = None
    if kind == "askd":
      teacher = build(2).eval()
      for p in teacher.parameters():
        p.requires_grad_(False)
      tfwd = torch.compile(teacher) if variant == "compile" else teacher

    def run(net=net, head=head, opt=opt, fwd=fwd, tfwd=tfwd, kind=kind):
      hr = preprocess()
      with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        x = hr
        if kind == "askd":
          with torch.no_grad():
            _, tf = tfwd(hr)
          x = degrade(hr)
        emb, sf = fwd(x)
        logits = head(emb.float(), labels)
        loss = F.cross_entropy(logits, labels)
        if kind == "askd":
          loss = loss + askd(sf, tf)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      if dev.type == "cuda":
        torch.cuda.synchronize()
      return loss.item()

    runners[kind] = run
  return runners


def _final_hw(size: int) -> int:
  for _ in range(4):  # conv3x3, stride 2, padding 1
    size = (size - 1) // 2 + 1
  return size


def _torch_blur_kernel(torch):
  """The official 5x5 kernel: sigma 2.0 along the height, 0.1 along the width, (1,1,5,5)."""
  k = [np.asarray(degrade_lib.gaussian_kernel1d(s)) for s in degrade_lib.OFFICIAL_SIGMA]
  return torch.from_numpy(np.outer(k[0], k[1]).astype(np.float32))[None, None]


# ---------------------------------------------------------------------------------------
# Timing and report


def _minor_faults() -> Optional[int]:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else None


def _timed(run: Callable[[], Any], rec: Dict[str, List[float]]) -> None:
  """Call `run` once, appending its wall and process CPU seconds and minor page faults."""
  t, c, f = time.perf_counter(), time.process_time(), _minor_faults()
  run()
  rec["wall"].append(time.perf_counter() - t)
  rec["cpu"].append(time.process_time() - c)
  if f is not None:
    rec["faults"].append(_minor_faults() - f)


def _records(runners) -> Dict[str, Dict[str, List[float]]]:
  return {k: {"wall": [], "cpu": [], "faults": []} for k in runners}


def time_interleaved(runners: Dict[str, Callable[[], Any]], steps: int):
  """One warm-up call each (excluded), then `steps` rounds of one timed call per runner.

  Returns {name: {"wall": seconds per step, "cpu": process CPU seconds per step,
  "faults": minor page faults of the process per step (empty without `resource`)}}.
  """
  for run in runners.values():
    run()
  rec = _records(runners)
  for _ in range(steps):
    for k, run in runners.items():
      _timed(run, rec[k])
  return rec


def time_blocked(runners: Dict[str, Callable[[], Any]], steps: int):
  """Each runner in turn: one warm-up call (excluded), then `steps` timed calls in a row.

  Every implementation runs back to back with itself, as it does in training (no step of
  another framework between two of its steps); same return value as `time_interleaved`.
  """
  rec = _records(runners)
  for k, run in runners.items():
    run()
    for _ in range(steps):
      _timed(run, rec[k])
  return rec


SCHEDULES = {"interleaved": time_interleaved, "blocked": time_blocked}


def machine_info() -> Dict[str, str]:
  info = {"host": platform.node(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "",
          "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
          "devices": str(jax.device_count()), "cpus": str(os.cpu_count())}
  try:
    import flax  # pylint: disable=g-import-not-at-top
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    info["cpu"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu"] = platform.processor()
  try:
    info["load_avg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
  except OSError:
    pass
  if "torch" in sys.modules:
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    info["torch_threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
  return info


COLUMNS = ("model", "step", "batch", "impl", "compile s", "compile cpu s", "step ms",
           "step cpu ms", "faults/step", "img/s",
           "JAX speed-up", "GFLOP/img", "MFU")


def bench_batch(args, batch: int, profiles: Optional[Dict[str, Any]] = None,
                peaks: Optional[Dict[int, int]] = None) -> List[Dict[str, Any]]:
  """Rows (one per step kind and implementation) for one batch size.

  profiles: with `--profile`, filled with {"<impl> <step> b<batch>": step_profile summary}.
  peaks: if given, filled with {batch: peak bytes} of the compiled A-SKD step (for
  `memory_report`'s `known`).
  """
  rows = []
  jfns = jax_step_fns(args, batch)
  runners, compile_s, flops = {}, {}, {}
  for kind, spec in jfns.items():
    for impl in (["jax"] + (["jax xla-defaults"] if args.xla_defaults else [])):
      args_k = spec["args"]
      if impl != "jax":  # its own state: the other one is donated
        args_k = (jax.tree.map(jnp.copy, args_k[0]),) + args_k[1:]
      compiled, wall, cpu = compile_step(spec["fn"], args_k, tuned=impl == "jax")
      compile_s[(impl, kind)] = (wall, cpu)
      flops.setdefault(kind, cost_flops(compiled))
      mem = peak_bytes(compiled) if impl == "jax" and kind == "askd" else None
      if mem is not None and peaks is not None:
        peaks[batch] = mem
      _progress(f"{impl} {kind} b{batch}: compiled in {wall:.1f} s"
                + (f", peak {mem / 1e9:.2f} GB" if mem else ""))
      runners[(impl, kind)] = jax_runner(compiled, args_k)
  for variant in args.torch_variants:
    for kind, run in torch_runners(args, batch, variant).items():
      t = time.perf_counter()
      run()  # torch.compile compiles here; eager: a first step (allocator warm-up)
      first = time.perf_counter() - t
      compile_s[(variant, kind)] = (first, None) if variant == "compile" else (None, None)
      _progress(f"torch {variant} {kind} b{batch}: first step {first:.1f} s")
      runners[(variant, kind)] = run
  rec = SCHEDULES[args.schedule](runners, args.steps)
  kind_dev = jax.devices()[0].device_kind
  peak = peak_flops(kind_dev, args.dtype)
  model = (f"iResNet{args.depth}-CBAM w{args.width:g}" if not args.stage_sizes else
           f"iResNet-CBAM {args.stage_sizes} w{args.width:g} d{args.embedding_dim}")
  for (impl, kind), r in rec.items():
    ts = r["wall"]
    med = statistics.median(ts)
    jax_med = statistics.median(rec[("jax", kind)]["wall"])
    fl = flops[kind] / batch if flops.get(kind) else None
    ips = batch / med
    rows.append({
        "model": f"{model} {args.size}px {args.dtype}", "step": kind, "batch": batch,
        "impl": impl if impl.startswith("jax") else f"torch {impl}",
        "compile s": compile_s[(impl, kind)][0], "compile cpu s": compile_s[(impl, kind)][1],
        "step ms": 1e3 * med, "step cpu ms": 1e3 * statistics.median(r["cpu"]),
        "faults/step": int(statistics.median(r["faults"])) if r["faults"] else None,
        "img/s": ips,
        "JAX speed-up": med / jax_med, "GFLOP/img": fl / 1e9 if fl else None,
        "MFU": ips * fl / peak if (fl and peak) else None, "times": ts})
    _progress(f"{rows[-1]['impl']} {kind} b{batch}: {1e3 * med:.1f} ms/step, {ips:.1f} img/s, "
              f"JAX speed-up {med / jax_med:.2f}")
  if args.profile and profiles is not None:
    for (impl, kind), run in runners.items():
      key = f"{impl if impl.startswith('jax') else 'torch ' + impl} {kind} b{batch}"
      try:
        if impl.startswith("jax"):
          logdir = os.path.join(args.profile, key.replace(" ", "_"))
          profiles[key] = step_profile.profile_jax(run, logdir, args.profile_steps)
        else:
          profiles[key] = step_profile.profile_torch(run, args.profile_steps)
        cats = ", ".join(f"{c} {v:.1f}" for c, v in profiles[key]["categories"].items())
        _progress(f"profile {key}: {profiles[key]['total_ms']:.1f} ms/step ({cats})")
      except Exception as e:  # pylint: disable=broad-except
        _progress(f"profiling {key} failed ({type(e).__name__}: {e}); the timings stand")
  return rows


def _progress(msg: str) -> None:
  """One line on stderr as each result comes (a run cut short keeps what it measured)."""
  print(f"bench: {msg}", file=sys.stderr, flush=True)


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


def markdown(rows: Sequence[Dict[str, Any]], info: Dict[str, str], command: str,
             memory: Optional[Dict[str, Any]] = None, schedule: str = "interleaved") -> str:
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  lines = [f"### {stamp}: {info['device']}", "", f"`{command}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v), "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    cells = [_fmt(r[c]) for c in COLUMNS]
    cells[COLUMNS.index("MFU")] = (f"{100 * r['MFU']:.1f}%" if r["MFU"] is not None else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"step ms: median wall time over the {schedule} timed steps (warm-up "
            "excluded); step cpu ms: median CPU time of the process in a step (all threads; "
            "spinning threads count); faults/step: median minor page faults of the process in a "
            "step; JAX speed-up: the "
            "implementation's step time / the JAX step time (> 1: JAX is faster); GFLOP/img: "
            "XLA cost_analysis of the compiled JAX step / batch (the A-SKD step includes the "
            "teacher's forward); compile s: JAX lower+compile (wall; compile cpu s: the process's CPU "
            "time, meaningful on a loaded machine), torch.compile's first step; jax: compiled "
            "with askd_jax.train.step.compiler_options(); jax xla-defaults: without."]
  if memory:
    gb = lambda b: f"{b / 1e9:.2f} GB" if b is not None else "n/a"
    lines += ["", f"Memory (compiled A-SKD step, XLA memory_analysis on {info['device']}): "
              f"peak {gb(memory['peak_bytes'])} at batch {memory['batch']}, "
              f"{gb(memory.get('peak_bytes_half'))} at batch {memory['batch'] // 2}; largest "
              f"batch under 80 GB (linear extrapolation): {memory['max_batch_80gb']}."]
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m askd_jax.tools.bench", description=__doc__.split(
      "\n")[0])
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--stage_sizes", default="", help="e.g. 1,1,1,1 (overrides --depth)")
  p.add_argument("--embedding_dim", type=int, default=512)
  p.add_argument("--classes", type=int, default=10572, help="ArcFace classes (CASIA: 10572)")
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--batch", default="32", help="comma-separated batch sizes")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up step)")
  p.add_argument("--schedule", default="interleaved", choices=tuple(SCHEDULES),
                 help="interleaved: rounds of one step of every implementation in turn; "
                 "blocked: each implementation's steps back to back")
  p.add_argument("--steps_kind", default="teacher,askd", help="teacher and/or askd")
  p.add_argument("--lr_sizes", default="14", help="student LR sizes, one drawn per image")
  p.add_argument("--torch", default="eager",
                 help=f"comma-separated subset of {TORCH_VARIANTS}, or 'none'")
  p.add_argument("--xla_defaults", action="store_true",
                 help="also time the JAX step compiled with XLA's default options")
  p.add_argument("--memory_batch", type=int, default=0,
                 help="also report the compiled A-SKD step's peak bytes at this batch (0: no)")
  p.add_argument("--tune_cpu", type=int, default=1, choices=(0, 1),
                 help="1: askd_jax.runtime.tune_cpu() first, as askd_jax.main does (process-"
                 "wide: the PyTorch steps run under the same allocator settings)")
  p.add_argument("--profile", default="",
                 help="folder: after timing, profile --profile_steps steps of every "
                 "implementation (jax.profiler traces land here) and add the device time by "
                 "kind of op to the output")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--out", default="", help="markdown file to append the table to")
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batch.split(",")]
  args.torch_variants = [] if args.torch in ("", "none") else args.torch.split(",")
  for v in args.torch_variants:
    if v not in TORCH_VARIANTS:
      p.error(f"--torch={args.torch}: {v!r} is not one of {TORCH_VARIANTS} or 'none'")
  if args.size < 16:
    p.error(f"--size={args.size} is too small for four stride-2 stages; use >= 16")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  tuned = tune_cpu() if args.tune_cpu else {}
  if args.torch_variants:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  rows, profiles, peaks = [], {}, {}
  for b in args.batches:
    rows += bench_batch(args, b, profiles, peaks)
  memory = memory_report(args, args.memory_batch, peaks) if args.memory_batch else None
  command = "python -m askd_jax.tools.bench " + " ".join(argv)
  info = machine_info()
  info["tune_cpu"] = ", ".join(k for k, v in tuned.items() if v) or "off"
  text = markdown(rows, info, command, memory, args.schedule)
  if profiles:
    text += "\n" + step_profile.markdown(profiles, info["device"])
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.write("\n" + text)
  return {"rows": rows, "memory": memory, "markdown": text, "profiles": profiles}


if __name__ == "__main__":
  main()
