"""ONNX export of a face model (`askd_jax.load` runs the file: api.py's `_load_onnx`).

    python -m askd_jax.tools.export --model=DIR --format=onnx --out=model.onnx
        [--embedding=flip_concat|plain] [--size=14] [--opset=18] [--fold_bn]

The file is what insightface's ArcFace ONNX models are: one input `images`, float32
(batch, 3, S, S) NCHW with a dynamic batch dimension, pixels normalised as
(x - 127.5) / 127.5, and one output `embedding`, float32 (batch, E). The channel order is the
network's own: RGB for a model trained here and for an official checkpoint converted with
the default --channel_order=rgb; BGR for one converted with --channel_order=bgr (the official
PyTorch code feeds OpenCV's BGR). `--embedding=flip_concat` (the default) gives
concat(emb(x), emb(flip x)), E = 2D, the embedding the verification evaluation compares and
its threshold belongs to; `plain` gives emb(x), E = D, one pass. `--size` builds in the
degradation of a student evaluated at that LR size, as for --format=jax. The parameters are
constants of the graph, the network in eval mode (running BatchNorm statistics, no dropout).
The model's metadata_props (onnx `ModelProto.metadata_props`, onnxruntime
`get_modelmeta().custom_metadata_map`) say all a consumer needs: input layout, size, channel
order, mean and std, the embedding and its size, the deploy threshold and where it was chosen,
the training resolution, the model spec and its evaluation results.

Converter: jax2onnx (github.com/enpasos/jax2onnx), pinned in requirements-deploy.txt. It
converts the jaxpr of the very function the evaluation runs (the task's forward pass in eval
mode and `verification.flip_concat_embed`), so there is no second model definition to keep in
step, and it needs only small pure-Python packages beside onnx. The alternatives: jax2tf +
tf2onnx needs TensorFlow (hundreds of MB, too heavy for the deploy and test extras) and converts
through a second graph IR; writing the ONNX graph by hand from the Flax parameters would be a
second implementation of iResNet-CBAM to keep in step with the JAX one. jax2onnx 0.13.0 is
used because it is the newest release whose requirements resolve with this project's
orbax-checkpoint==0.12.8 (0.13.1 to 0.17.1 require orbax-checkpoint<0.11.37; 0.17.1 also
converts the model when installed with --no-deps beside onnx-ir). The graph is traced with
the plain-op formulation of the model (`cpu_ops=False`, askd_jax/ops: the XLA:CPU forms
compute the same values with ops that only pay off on XLA:CPU). The converted graph keeps
each eval-mode BatchNorm as arithmetic on constants ((x - mean) / sqrt(var + eps) * scale +
bias); `--fold_bn` writes instead what onnxruntime's basic graph optimisations make of it
(constant folding, BatchNorm/Mul/Add fused into the convolutions and matmuls: standard ONNX
ops only, provider-independent; ~1150 -> ~460 nodes on the demo model), which onnxruntime
would otherwise do at every session start.
Opsets 18..23: jax2onnx writes ReduceMean/ReduceMax with `axes` as an input (opset 18), and
23 is the newest that jax2onnx 0.13 and onnxruntime 1.32 both know.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Dict, Optional

from askd_jax import api

FORMAT = api.ONNX_FORMAT
OPSETS = (18, 23)
DEFAULT_OPSET = 18
EMBEDDINGS = ("flip_concat", "plain")
MEAN = STD = api.ONNX_MEAN
require = api.require_deploy


def training_resolution(spec: Dict[str, Any]) -> str:
  """In words: the resolution the network was trained at, from its model.json."""
  s = int(spec["input_size"])
  if spec.get("sizes"):
    px = ", ".join(str(int(v)) for v in spec["sizes"])
    return (f"{px} px (a low-resolution student: faces degraded to {px} px and resized back "
            f"up to {s} px)")
  if spec.get("kind") == "teacher":
    return f"{s} px (high resolution)"
  return f"{s} px input; unknown training resolution (a converted checkpoint)"


def metadata(model: api.FaceModel, embedding: str, size: Optional[int], out_dim: int,
             opset: int) -> Dict[str, str]:
  """The file's metadata_props: strings, JSON for the structured ones."""
  import importlib.metadata
  import jax
  s = model.input_size
  order = str(model.spec.get("channel_order", "rgb")).lower()
  spec = {k: v for k, v in model.spec.items() if not k.startswith("_")}
  try:
    thr = model.threshold(size)
  except api.ModelError as e:
    thr, why = None, str(e)
  meta = {
      "format": FORMAT,
      "input": f"images: float32 (batch, 3, {s}, {s}) NCHW, {order.upper()}, "
               f"(x - {MEAN}) / {STD} for pixels x in 0..255",
      "input_size": str(s), "input_layout": "NCHW", "channel_order": order,
      "input_mean": str(MEAN), "input_std": str(STD),
      "output": ("embedding: float32 (batch, E), concat(emb(x), emb(flip x)), the embedding "
                 "the verification evaluation compares" if embedding == "flip_concat" else
                 "embedding: float32 (batch, E), emb(x)"),
      "embedding": embedding, "embedding_size": str(out_dim),
      "degradation_size": str(size or 0),
      "training_resolution": training_resolution(model.spec),
      "spec": json.dumps(spec), "evaluation": json.dumps(model.evaluation),
      "source": model.eval_target, "opset": str(opset),
      "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}, jax {jax.__version__}",
  }
  if thr is None:
    meta["threshold_note"] = f"no deploy threshold: {why}"
  else:
    where = (f"cosine similarity of flip_concat embeddings; chosen by the verification "
             f"evaluation on {thr.set_name} at {thr.resolution}"
             + (f" (accuracy {thr.accuracy:.4f})" if thr.accuracy is not None else ""))
    if embedding == "flip_concat":
      meta["threshold"] = repr(thr.value)
      meta["threshold_note"] = where
    else:
      meta["threshold_flip_concat"] = repr(thr.value)
      meta["threshold_note"] = (f"{where}; it does not apply to these plain embeddings: "
                                "export --embedding=flip_concat to use it")
  return meta


def check_options(embedding: str, opset: int) -> None:
  """ModelError for an unknown embedding, an opset out of range or a missing converter."""
  if embedding not in EMBEDDINGS:
    raise api.ModelError(f"--embedding={embedding}: choose {' or '.join(EMBEDDINGS)}")
  if not OPSETS[0] <= opset <= OPSETS[1]:
    raise api.ModelError(f"--opset={opset}: unsupported; choose {OPSETS[0]}..{OPSETS[1]} "
                         f"(default {DEFAULT_OPSET})")
  require(("jax2onnx", "onnx"), "--format=onnx")


def fold(proto, path: str) -> None:
  """Write `proto` to `path` as onnxruntime's basic graph optimisations leave it."""
  import onnxruntime as ort
  so = ort.SessionOptions()
  so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
  so.log_severity_level = 3  # errors only: not its notes on constants it leaves unfolded
  so.optimized_model_filepath = path
  ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def export(model: api.FaceModel, out: str, *, embedding: str = "flip_concat",
           size: Optional[int] = None, opset: int = DEFAULT_OPSET,
           fold_bn: bool = False) -> Dict[str, Any]:
  """Convert `model` (loaded from a model directory) and write `out` atomically; returns
  {'bytes', 'out_dim', 'metadata'}."""
  if model._traceable is None:
    raise api.ModelError(f"{model.path} is already an export; give the model directory it "
                         "was exported from")
  check_options(embedding, opset)
  import logging
  import jax.numpy as jnp
  import onnx
  # jax2onnx logs (with tracebacks) each optional plugin it skips (dm_pix's need another jax)
  # and onnx_ir each shape value it does not serialise: noise, not errors
  for name in ("jax2onnx", "onnx_ir"):
    logging.getLogger(name).setLevel(logging.ERROR)
  from jax2onnx import to_onnx
  size = model._check_size(size)
  fn = model._traceable(size, embedding == "flip_concat")
  s = model.input_size

  def graph(images):  # float32 (batch, 3, S, S), normalised, the network's channel order
    return fn(jnp.transpose(images, (0, 2, 3, 1)))

  try:
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx 0.13 prints debug lines
      proto = to_onnx(graph, [("batch", 3, s, s)], model_name="askd_jax_face", opset=opset,
                      input_names=["images"], output_names=["embedding"])
  except Exception as e:  # a primitive or shape jax2onnx does not handle: say which
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    raise api.ModelError(f"{model.path}: jax2onnx could not convert the model "
                         f"({type(e).__name__}: {msg}); export --format=jax instead") from e
  out_dim = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
  meta = metadata(model, embedding, size, out_dim, opset)
  meta["bn_folded"] = str(bool(fold_bn)).lower()
  onnx.helper.set_model_props(proto, meta)
  proto.doc_string = meta["input"] + " -> " + meta["output"]
  onnx.checker.check_model(proto, full_check=True)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fold_bn:
    require(("onnxruntime",), "--fold_bn")
    fold(proto, out + ".tmp")
    proto = onnx.load(out + ".tmp")
    onnx.checker.check_model(proto, full_check=True)
  else:
    with open(out + ".tmp", "wb") as f:
      f.write(proto.SerializeToString())
  os.replace(out + ".tmp", out)
  return {"bytes": os.path.getsize(out), "out_dim": out_dim, "metadata": meta,
          "nodes": len(proto.graph.node)}


def run_cli(args) -> int:
  """The body of `python -m askd_jax.tools.export --format=onnx` (args: its namespace)."""
  if not args.overwrite and os.path.exists(args.out):
    raise api.ModelError(f"--out: {args.out} exists; choose another file or pass --overwrite")
  if args.platforms != "cpu":
    raise api.ModelError("--platforms is an option of --format=jax; an ONNX file runs where "
                         "its runtime does")
  check_options(args.embedding, args.opset)  # before the (slow) load
  model = api.load(args.model)
  r = export(model, args.out, embedding=args.embedding, size=args.size or None,
             opset=args.opset, fold_bn=args.fold_bn)
  m = r["metadata"]
  s = model.input_size
  print(f"wrote {args.out} ({r['bytes'] / 2**20:.1f} MiB, opset {args.opset}, {r['nodes']} "
        f"nodes{', BatchNorm folded' if args.fold_bn else ''}): float32 "
        f"(batch, 3, {s}, {s}) NCHW {m['channel_order'].upper()}, (x - {MEAN}) / {STD} -> "
        f"float32 (batch, {r['out_dim']}) {args.embedding}"
        + (f", degraded to {args.size} px" if args.size else "")
        + (f"; threshold {float(m['threshold']):.4f}" if "threshold" in m else ""))
  return 0
