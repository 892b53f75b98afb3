"""Embedding throughput: the ONNX export in onnxruntime (CPU) beside JAX's jitted embedding.

    python -m askd_jax.tools.bench_onnx --model=DIR [--batch=1,32] [--rounds=5]

Both sides compute the same flip-concat embedding of uint8 face crops: JAX through
`askd_jax.load(DIR)` (the task's jitted `embed_fn`, one compiled shape per batch size, the
XLA:CPU op forms on a CPU); onnxruntime through the file `python -m askd_jax.tools.export
--format=onnx` writes (a temporary one), in a default `InferenceSession` on the
CPUExecutionProvider (all its graph optimisations, its default thread count), fed the
normalised NCHW float input. Timing: synthetic images; compilation and session creation
are reported apart; one warm-up call per side is excluded; then `--rounds` rounds in which
each side embeds one batch in turn (interleaved, so that a change of the machine's load hits
both alike); the median per side is reported as images per second. The load average at the
start and end is printed: on a shared machine, say it beside the numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

PROG = "python -m askd_jax.tools.bench_onnx"


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="stage directory or converted checkpoint "
                 "directory")
  p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size")
  args = p.parse_args(argv)
  try:
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
  except ValueError:
    p.error(f"--batch={args.batch}: give comma-separated integers, e.g. 1,32")
  if not batches or min(batches) < 1 or args.rounds < 1:
    p.error("--batch sizes and --rounds must be >= 1")
  from askd_jax import api
  return api.run_cli(PROG, lambda: _bench(args.model, batches, args.rounds))


def _bench(model_dir: str, batches, rounds: int) -> int:
  import jax
  import onnxruntime as ort
  from askd_jax import api
  from askd_jax.tools import onnx_export
  load0 = os.getloadavg()[0]
  model = api.load(model_dir)
  s = model.input_size
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.onnx")
    t = time.perf_counter()
    onnx_export.export(model, path)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - t
  rng = np.random.RandomState(0)
  rows = []
  for b in batches:
    x = rng.randint(0, 256, (b, s, s, 3)).astype(np.uint8)
    xn = np.ascontiguousarray(((x.astype(np.float32) - onnx_export.MEAN) / onnx_export.STD)
                              .transpose(0, 3, 1, 2))
    run_jax = lambda: jax.block_until_ready(model._batch_fn(x, None, 0))
    run_ort = lambda: sess.run(["embedding"], {"images": xn})[0]
    t = time.perf_counter()
    run_jax()  # compiles this shape
    compile_s = time.perf_counter() - t
    run_ort()
    times = {"jax": [], "ort": []}
    for _ in range(rounds):
      for name, fn in (("jax", run_jax), ("ort", run_ort)):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows.append((b, b / med["ort"], b / med["jax"], compile_s))
  print(f"model {model_dir}: {s} px, embedding {2 * int(model.spec['embedding_dim'])} floats "
        f"(flip-concat); jax {jax.__version__}, onnxruntime {ort.__version__}, "
        f"{os.cpu_count()} CPUs; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
  print(f"ONNX conversion {convert_s:.1f} s, session creation {session_s:.1f} s; "
        f"median of {rounds} interleaved rounds")
  print("| batch | onnxruntime CPU img/s | JAX jit img/s | ratio | JAX compile s |")
  print("|---:|---:|---:|---:|---:|")
  for b, o, j, c in rows:
    print(f"| {b} | {o:.2f} | {j:.2f} | {o / j:.2f} | {c:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
