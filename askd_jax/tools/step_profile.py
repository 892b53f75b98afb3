"""Where a training step's time goes: device time per op and per kind of op, JAX and PyTorch.

Used by `python -m askd_jax.tools.bench --profile=DIR`. The JAX step is traced with
`jax.profiler.trace(..., create_perfetto_trace=True)` and the trace's op events are summed
by name; on a GPU or TPU only the device's events count (the kernels on its streams), on a
CPU XLA's op events on the host's threads. The PyTorch step is profiled with
`torch.profiler` (self device time of the CUDA kernels on a GPU, self CPU time of the
operators on a CPU). Both are summed into the same coarse categories (convolution, matmul,
normalisation, reduction, copy/transpose, elementwise) by the names of their ops, so the two
frameworks can be compared side by side; the categories are read from names and are
approximate, the per-op list is exact.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# First match wins: cuDNN's batch-norm kernels before the convolutions, cuDNN/CUTLASS
# convolution kernels (their names say implicit_gemm too) before the matmuls.
CATEGORIES: Tuple[Tuple[str, "re.Pattern[str]"], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
        ("normalisation", r"batch_?norm|bn_fw|bn_bw|bn_bwd|bn_fwd|welford|native_batch_norm"),
        ("convolution", r"conv(?!ert)|cudnn|fprop|dgrad|wgrad"),
        ("matmul", r"gemm|\bdot|dot_|cublas|matmul|cutlass|\bmm\b|addmm|bmm|linear"),
        ("reduction", r"reduc|triton_red|triton_per|\bsum\b|\bmean\b|\bamax|\bmax_|softmax"
                      r"|norm"),
        ("copy/transpose", r"transpose|copy|memcpy|memset|permute|contiguous|cat_|concat"
                           r"|pad|slice|gather|scatter|index"),
        ("elementwise", r"fusion|elementwise|vectorized|unrolled|pointwise|triton_|add|mul"
                        r"|sigmoid|prelu|relu|where|select|div|sub|exp|sqrt|rsqrt|fill"),
    ))
OTHER = "other"
CATEGORY_NAMES = tuple(c for c, _ in CATEGORIES) + (OTHER,)
# Host-side wrapper events of a JAX trace on a CPU (not ops).
_HOST_WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "PjRt", "Execute", "XlaModule",
                  "jit_", "pjit", "ParseArguments", "Common")


def categorize(name: str) -> str:
  for cat, pattern in CATEGORIES:
    if pattern.search(name):
      return cat
  return OTHER


def _strip_suffix(name: str) -> str:
  """`loop_multiply_fusion.12` (XLA:CPU) or `_12` (XLA:GPU kernels) -> `loop_multiply_fusion`:
  XLA numbers its instructions."""
  return re.sub(r"([._]\d+)+$", "", name)


def summarize(events: Sequence[Tuple], steps: int, top: int = 15) -> Dict[str, Any]:
  """events: (name, microseconds[, calls]). Per step: total ms, ms by category, top ops."""
  by_name: Dict[str, float] = collections.Counter()
  counts: Dict[str, int] = collections.Counter()
  for name, us, *n in events:
    key = _strip_suffix(name)
    by_name[key] += us
    counts[key] += n[0] if n else 1
  cats = {c: 0.0 for c in CATEGORY_NAMES}
  for key, us in by_name.items():
    cats[categorize(key)] += us / 1e3 / steps
  total = sum(by_name.values()) / 1e3 / steps
  ops = [{"name": k, "ms": us / 1e3 / steps, "calls": counts[k] / steps}
         for k, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]
  return {"steps": steps, "total_ms": total, "categories": cats, "ops": ops}


def _trace_file(logdir: str) -> str:
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {logdir}: jax.profiler wrote no "
                            "perfetto trace (is the profiler plugin installed?)")
  return files[-1]


def jax_trace_events(path: str) -> Tuple[List[Tuple[str, float]], Dict[str, float]]:
  """(op events, ms by process/thread) of a perfetto trace written by jax.profiler.

  Device processes (`/device:GPU:0`, ...) win when the trace has any: their kernel events
  on the streams are the device time. Without them (CPU), XLA's op events on the host's
  threads, wrapper events left out.
  """
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  evs = data["traceEvents"] if isinstance(data, dict) else data
  pname, tname = {}, {}
  for e in evs:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  spans = [e for e in evs if e.get("ph") == "X" and "dur" in e]
  lines: Dict[str, float] = collections.Counter()
  for e in spans:
    pid, tid = e["pid"], e.get("tid")
    lines[f"{pname.get(pid, pid)} / {tname.get((pid, tid), tid)}"] += e["dur"] / 1e3
  device = {p for p, n in pname.items() if "/device:" in n and "CPU" not in n}
  if device:
    # The kernels are on the streams; XLA's derived op/module lines would count them twice.
    streams = {k for k, n in tname.items() if k[0] in device and "stream" in n.lower()}
    keep = (lambda e: (e["pid"], e.get("tid")) in streams) if streams else (
        lambda e: e["pid"] in device)
    return [(e["name"], e["dur"]) for e in spans if keep(e)], dict(lines)
  return [(e["name"], e["dur"]) for e in spans
          if not str(e["name"]).startswith(_HOST_WRAPPERS) and "::" not in str(e["name"])
          ], dict(lines)


def profile_jax(run: Callable[[], Any], logdir: str, steps: int = 3, top: int = 15
                ) -> Dict[str, Any]:
  """Trace `steps` calls of `run` (each blocks until its step is done) and summarise."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(logdir, exist_ok=True)
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      run()
  path = _trace_file(logdir)
  events, lines = jax_trace_events(path)
  out = summarize(events, steps, top)
  out["trace"] = path
  out["lines_ms"] = dict(sorted(lines.items(), key=lambda kv: -kv[1])[:12])
  return out


def profile_torch(run: Callable[[], Any], steps: int = 3, top: int = 15) -> Dict[str, Any]:
  """torch.profiler over `steps` calls of `run`: CUDA kernels' self device time on a GPU,
  else the operators' self CPU time (leaf operators only, so nothing counts twice)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
  with profile(activities=acts) as prof:
    for _ in range(steps):
      run()
  events = []
  if cuda:
    for e in prof.events():
      dt = getattr(e, "device_type", None)
      if dt is not None and "CUDA" in str(dt):
        events.append((e.name, float(e.time_range.elapsed_us())))
    if not events:  # older/newer profilers: the kernels' self device time by key
      for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
          events.append((e.key, float(us), e.count))
  else:
    for e in prof.key_averages():
      if e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "Optimizer")):
        events.append((e.key, float(e.self_cpu_time_total), e.count))
  return summarize(events, steps, top)


def markdown(profiles: Dict[str, Dict[str, Any]], device: str) -> str:
  """Category table (ms per step) and each implementation's top ops."""
  if not profiles:
    return ""
  cols = ("impl / step", "total ms") + CATEGORY_NAMES
  lines = [f"Profile ({device}; ms of {'device' if 'cpu' not in device.lower() else 'op'} "
           "time per step by kind of op, from the ops' names; JAX: jax.profiler trace, "
           "PyTorch: torch.profiler):", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for key, p in profiles.items():
    lines.append("| " + " | ".join([key, f"{p['total_ms']:.1f}"] + [
        f"{p['categories'][c]:.1f}" for c in CATEGORY_NAMES]) + " |")
  for key, p in profiles.items():
    lines += ["", f"Top ops, {key} (ms per step, calls per step):", ""]
    lines += [f"- {o['ms']:.2f} ms, {o['calls']:g}x `{o['name'][:110]}`" for o in p["ops"]]
  return "\n".join(lines) + "\n"
