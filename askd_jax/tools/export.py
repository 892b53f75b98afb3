"""Export a face model as one portable file: StableHLO with its parameters, via jax.export,
or an ONNX model (--format=onnx: onnxruntime and the runtimes that start from ONNX;
tools/onnx_export.py).

    python -m askd_jax.tools.export --model=DIR --out=model.jaxexport [--size=14]
        [--platforms=cpu,cuda] [--overwrite]
    python -m askd_jax.tools.export --model=DIR --format=onnx --out=model.onnx
        [--embedding=flip_concat|plain] [--size=14] [--opset=18] [--fold_bn] [--overwrite]

The file holds the eval-mode embedder, uint8 (batch, S, S, 3) RGB -> float32 (batch, 2D)
concat(emb(x), emb(flip x)), with the batch dimension symbolic and the parameters baked in
as constants (a converted BGR checkpoint reverses the channels inside: feed RGB). --size
builds the degradation of a student evaluated at that LR size into it. Load and run it with
JAX alone, no askd_jax:

    import jax, numpy as np
    exp = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
    emb = exp.call(images)          # images: uint8 (N, S, S, 3) RGB, aligned face crops

Beside it, model.jaxexport.json records the model spec, the size and the evaluation results
(its verification thresholds), which `askd_jax.load("model.jaxexport")` and the verify tool
read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

PROG = "python -m askd_jax.tools.export"


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="stage directory or converted checkpoint "
                 "directory")
  p.add_argument("--out", required=True, help="the file to write (e.g. model.jaxexport)")
  p.add_argument("--size", type=int, default=0, help="build in the degradation of a student "
                 "evaluated at this LR size (0: none)")
  p.add_argument("--platforms", default="cpu", help="comma-separated platforms the file runs "
                 "on: cpu, cuda, rocm, tpu")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--format", choices=("jax", "onnx"), default="jax", help="jax: a jax.export "
                 "file (default); onnx: an ONNX model (needs requirements-deploy.txt)")
  p.add_argument("--embedding", choices=("flip_concat", "plain"), default="flip_concat",
                 help="onnx: concat(emb(x), emb(flip x)) as the evaluation (default) or emb(x)")
  p.add_argument("--opset", type=int, default=None, help="onnx: the ONNX opset, 18..23 "
                 "(default 18)")
  p.add_argument("--fold_bn", action="store_true", help="onnx: fold BatchNorm and constants "
                 "into the convolutions (onnxruntime's basic graph optimisations)")
  args = p.parse_args(argv)
  if args.format == "jax" and (args.embedding != "flip_concat" or args.opset is not None
                               or args.fold_bn):
    p.error("--embedding, --opset and --fold_bn are options of --format=onnx")
  if args.opset is None:
    args.opset = 18
  from askd_jax import api
  return api.run_cli(PROG, lambda: _export(args))


def _export(args) -> int:
  from askd_jax import api
  from askd_jax.tools.paths import check_output
  if args.format == "onnx":
    from askd_jax.tools import onnx_export
    check_output("--out", args.out, overwrite=args.overwrite)  # before any work
    return onnx_export.run_cli(args)
  out = args.out
  side = out + api.SIDECAR_SUFFIX
  check_output("--out", out, overwrite=args.overwrite, extra=(side,))  # before any work
  platforms = [s.strip() for s in args.platforms.split(",") if s.strip()]
  bad = [s for s in platforms if s not in ("cpu", "cuda", "rocm", "tpu")]
  if bad or not platforms:
    raise api.ModelError(f"--platforms={args.platforms}: choose from cpu, cuda, rocm, tpu")
  model = api.load(args.model)
  exp = model.export(args.size or None, platforms)
  data = exp.serialize()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for path, write in ((out, lambda f: f.write(data)),
                      (side, lambda f: f.write(json.dumps(
                          api.export_metadata(model, args.size), indent=2).encode()))):
    with open(path + ".tmp", "wb") as f:
      write(f)
    os.replace(path + ".tmp", path)
  s = model.input_size
  print(f"wrote {out} ({len(data) / 2**20:.1f} MiB, {', '.join(exp.platforms)}): uint8 "
        f"(batch, {s}, {s}, 3) RGB -> float32 (batch, {exp.out_avals[0].shape[-1]})"
        + (f", degraded to {args.size} px" if args.size else "") + f"; metadata in {side}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
