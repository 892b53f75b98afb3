"""Convert the authors' PyTorch checkpoints into an askd_jax model directory.

    python -m askd_jax.tools.convert --net=last_net.ckpt [--margin=last_margin.ckpt] \
        --out=DIR [--depth=50] [--width=1.0] [--channel_order=rgb|bgr] [--input_size=112]
        [--overwrite]

The official `*_net.ckpt` holds {'iters', 'net_state_dict'} of `CBAMResNet`; the margin file
holds the `ArcMarginProduct` state ({'weight': (classes, 512)}) under the same key. The
result is `MarginModel(iresnet_cbam(...), ArcFace(...))` variables written with
`askd_jax.train.checkpoint.export_model`, loadable by evaluation and as a frozen teacher.

Layout changes (all in `torch_state_to_flax`, inverse in `flax_to_torch_state`):
  * conv OIHW -> HWIO; the CBAM 1x1-conv MLP (O, I, 1, 1) -> Dense (I, O);
  * output_layer.3 Linear (D, C*H*W) flattens NCHW; the Flax model flattens NHWC, so its
    kernel is the weight reshaped (D, C, H, W) -> (H, W, C, D) -> (H*W*C, D);
  * BN weight/bias/running_mean/running_var -> scale/bias/mean/var
    (num_batches_tracked is ignored); PReLU weight -> alpha;
  * the official networks consume BGR (OpenCV, never converted). By default the stem
    conv's input channels are reversed so the converted model consumes RGB like the
    rest of askd_jax; `--channel_order=bgr` keeps them (then feed BGR).
Any missing, extra or mis-shaped tensor is refused with a one-line error.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

STAGE_SIZES = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
BASE_WIDTHS = (64, 128, 256, 512)
REDUCTION = 16
CHANNEL_ORDERS = ("rgb", "bgr")

Array = np.ndarray
Tree = Dict[str, Any]


class ConvertError(ValueError):
  """A checkpoint that cannot be converted; the message is one line."""


def widths_for(width: float) -> Tuple[int, ...]:
  """Same rounding as askd_jax.models.iresnet_cbam."""
  return tuple(max(int(round(c * width)), 1) for c in BASE_WIDTHS)


# ---------------------------------------------------------------------------------------
# The layer table: (torch prefix, kind, flax path, shape args), in the official order.
# kinds: conv (OIHW), bn (2d or 1d), prelu, mlp (1x1 conv used as Dense), linear_nchw.

def _layers(stage_sizes: Sequence[int], widths: Sequence[int], embedding_dim: int,
            out_hw: int) -> Iterator[Tuple[str, str, Tuple[str, ...], tuple]]:
  c0 = widths[0]
  yield "input_layer.0", "conv", ("stem_conv",), (c0, 3, 3)
  yield "input_layer.1", "bn", ("stem_bn",), (c0,)
  yield "input_layer.2", "prelu", ("stem_prelu",), (c0,)
  cin = c0
  for i, (n, c) in enumerate(zip(stage_sizes, widths)):
    for j in range(n):
      t, f = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      b_in = cin if j == 0 else c
      hidden = max(c // REDUCTION, 1)
      yield f"{t}.res_layer.0", "bn", (f, "bn1"), (b_in,)
      yield f"{t}.res_layer.1", "conv", (f, "conv1"), (c, b_in, 3)
      yield f"{t}.res_layer.2", "bn", (f, "bn2"), (c,)
      yield f"{t}.res_layer.3", "prelu", (f, "prelu"), (c,)
      yield f"{t}.res_layer.4", "conv", (f, "conv2"), (c, c, 3)
      yield f"{t}.res_layer.5", "bn", (f, "bn3"), (c,)
      yield f"{t}.channel_layer.shared_mlp.0", "mlp", (f, "cbam", "channel", "fc1"), (hidden, c)
      yield f"{t}.channel_layer.shared_mlp.2", "mlp", (f, "cbam", "channel", "fc2"), (c, hidden)
      yield f"{t}.spatial_layer.conv", "conv", (f, "cbam", "spatial", "conv"), (1, 2, 3)
      if j == 0:  # the official model gives every stage's first block a projection
        yield f"{t}.shortcut_layer.0", "conv", (f, "shortcut_conv"), (c, b_in, 1)
        yield f"{t}.shortcut_layer.1", "bn", (f, "shortcut_bn"), (c,)
    cin = c
  yield "output_layer.0", "bn", ("out_bn",), (cin,)
  yield "output_layer.3", "linear_nchw", ("fc",), (embedding_dim, cin, out_hw)
  yield "output_layer.4", "bn", ("fc_bn",), (embedding_dim,)


def _torch_shapes(kind: str, args: tuple) -> Dict[str, Tuple[int, ...]]:
  """Official tensor names (suffixes) and shapes of one layer."""
  if kind == "conv":
    o, i, k = args
    return {"weight": (o, i, k, k)}
  if kind == "bn":
    return {s: args for s in ("weight", "bias", "running_mean", "running_var")}
  if kind == "prelu":
    return {"weight": args}
  if kind == "mlp":
    return {"weight": args + (1, 1)}
  if kind == "linear_nchw":
    d, c, hw = args
    return {"weight": (d, c * hw * hw), "bias": (d,)}
  raise AssertionError(kind)


def expected_torch_shapes(stage_sizes: Sequence[int], widths: Sequence[int],
                          embedding_dim: int = 512, out_hw: int = 7) -> Dict[str, Tuple[int, ...]]:
  """Every tensor of the official state dict (except num_batches_tracked) and its shape."""
  out = {}
  for prefix, kind, _, args in _layers(stage_sizes, widths, embedding_dim, out_hw):
    for suffix, shape in _torch_shapes(kind, args).items():
      out[f"{prefix}.{suffix}"] = tuple(shape)
  return out


def _set(tree: Tree, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Tree, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


# ---------------------------------------------------------------------------------------
# Architecture inference.

def _fmt(shape) -> str:
  return str(tuple(int(s) for s in shape))


def infer_arch(state: Dict[str, Array], source: str = "checkpoint") -> Dict[str, Any]:
  """stage_sizes, width, widths, embedding_dim, out_hw from the tensor names and shapes."""
  def need(key):
    if key not in state:
      raise ConvertError(f"{source}: missing tensor {key!r}; cannot infer the architecture "
                         "(is this an official iResNet-CBAM net checkpoint?)")
    return np.shape(state[key])

  stem = need("input_layer.0.weight")
  if len(stem) != 4 or stem[1] != 3:
    raise ConvertError(f"{source}: tensor 'input_layer.0.weight' has shape {_fmt(stem)}, "
                       "expected (C, 3, 3, 3)")
  width = stem[0] / BASE_WIDTHS[0]
  stage_sizes = []
  for i in range(1, 5):
    idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")
           and k.split(".")[1].isdigit()}
    if not idx:
      raise ConvertError(f"{source}: no tensors 'layer{i}.*'; an iResNet-CBAM checkpoint has "
                         "four stages layer1..layer4")
    stage_sizes.append(max(idx) + 1)  # a gap shows up later as missing tensors
  fc = need("output_layer.3.weight")
  widths = widths_for(width)
  flat = fc[1] if len(fc) == 2 else -1
  out_hw = int(round(math.sqrt(max(flat, 0) / widths[3])))
  if len(fc) != 2 or out_hw * out_hw * widths[3] != flat:
    raise ConvertError(f"{source}: tensor 'output_layer.3.weight' has shape {_fmt(fc)}, "
                       f"expected (D, {widths[3]} * H * W) with H == W")
  return {"stage_sizes": tuple(stage_sizes), "width": width, "widths": widths,
          "embedding_dim": int(fc[0]), "out_hw": out_hw}


def depth_of(stage_sizes: Sequence[int]) -> Optional[int]:
  return next((d for d, s in STAGE_SIZES.items() if tuple(s) == tuple(stage_sizes)), None)


# ---------------------------------------------------------------------------------------
# The pure mapping.

def _check(state: Dict[str, Array], expected: Dict[str, Tuple[int, ...]], source: str,
           hint: str) -> None:
  keys = {k for k in state if not k.endswith("num_batches_tracked")}
  problems = []
  order = {k: i for i, k in enumerate(expected)}
  for k in sorted(set(expected) - keys, key=order.get):
    problems.append(f"missing tensor {k!r} (expected shape {_fmt(expected[k])})")
  for k in sorted(keys - set(expected)):
    problems.append(f"unexpected tensor {k!r} of shape {_fmt(np.shape(state[k]))}")
  for k in expected:
    if k in keys and tuple(np.shape(state[k])) != expected[k]:
      problems.append(f"tensor {k!r} has shape {_fmt(np.shape(state[k]))}, "
                      f"expected {_fmt(expected[k])}")
  if problems:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise ConvertError(f"{source}: {problems[0]}{more}; {hint}")


def _to_flax(kind: str, args: tuple, t: Dict[str, Array]) -> Dict[str, Dict[str, Array]]:
  """One layer's tensors -> {'params': {...}, 'batch_stats': {...}} leaves."""
  f32 = lambda a: np.array(a, np.float32)  # a copy: never alias the caller's tensors
  if kind == "conv":
    return {"params": {"kernel": f32(t["weight"]).transpose(2, 3, 1, 0)}}  # OIHW -> HWIO
  if kind == "mlp":
    return {"params": {"kernel": f32(t["weight"])[:, :, 0, 0].T}}  # (O, I) -> (I, O)
  if kind == "prelu":
    return {"params": {"alpha": f32(t["weight"])}}
  if kind == "bn":
    return {"params": {"scale": f32(t["weight"]), "bias": f32(t["bias"])},
            "batch_stats": {"mean": f32(t["running_mean"]), "var": f32(t["running_var"])}}
  if kind == "linear_nchw":
    d, c, hw = args
    w = f32(t["weight"]).reshape(d, c, hw, hw).transpose(2, 3, 1, 0).reshape(hw * hw * c, d)
    return {"params": {"kernel": w, "bias": f32(t["bias"])}}
  raise AssertionError(kind)


def _to_torch(kind: str, args: tuple, v: Dict[str, Dict[str, Array]]) -> Dict[str, Array]:
  p = {k: np.asarray(a, np.float32) for k, a in v.get("params", {}).items()}
  s = {k: np.asarray(a, np.float32) for k, a in v.get("batch_stats", {}).items()}
  if kind == "conv":
    return {"weight": p["kernel"].transpose(3, 2, 0, 1)}
  if kind == "mlp":
    return {"weight": p["kernel"].T[:, :, None, None]}
  if kind == "prelu":
    return {"weight": p["alpha"]}
  if kind == "bn":
    return {"weight": p["scale"], "bias": p["bias"], "running_mean": s["mean"],
            "running_var": s["var"], "num_batches_tracked": np.array(0, np.int64)}
  if kind == "linear_nchw":
    d, c, hw = args
    w = p["kernel"].reshape(hw, hw, c, d).transpose(3, 2, 0, 1).reshape(d, c * hw * hw)
    return {"weight": w, "bias": p["bias"]}
  raise AssertionError(kind)


def _check_order(channel_order: str) -> None:
  if channel_order not in CHANNEL_ORDERS:
    raise ConvertError(f"channel_order={channel_order!r}: choose 'rgb' (default, reverse the "
                       "stem for RGB input) or 'bgr' (the official input order)")


def torch_state_to_flax(state_dict: Dict[str, Array], margin_state: Dict[str, Array] | None = None,
                        *, stage_sizes: Sequence[int] | None = None, width: float | None = None,
                        channel_order: str = "rgb", source: str = "checkpoint",
                        margin_source: str = "margin checkpoint"
                        ) -> Tuple[Tree, Dict[str, Any]]:
  """Official state dicts (numpy) -> (variables of MarginModel, arch info).

  variables = {'params': {'backbone': ..., ['head': {'kernel'}]}, 'batch_stats': {'backbone'}}.
  stage_sizes / width default to what the tensors say; given, they are enforced.
  channel_order is the order the *converted* model consumes ('rgb' reverses the stem).
  """
  _check_order(channel_order)
  state = _strip_module(state_dict)
  arch = infer_arch(state, source)
  if stage_sizes is not None:
    arch["stage_sizes"] = tuple(stage_sizes)
  if width is not None:
    arch["width"], arch["widths"] = width, widths_for(width)
  layers = list(_layers(arch["stage_sizes"], arch["widths"], arch["embedding_dim"],
                        arch["out_hw"]))
  expected = expected_torch_shapes(arch["stage_sizes"], arch["widths"], arch["embedding_dim"],
                                   arch["out_hw"])
  depth = depth_of(arch["stage_sizes"])
  _check(state, expected, source,
         f"expected iResNet-CBAM stage sizes {list(arch['stage_sizes'])} "
         f"({f'depth {depth}' if depth else 'custom depth'}), "
         f"widths {list(arch['widths'])}: check --depth/--width or the file")
  variables: Tree = {"params": {"backbone": {}}, "batch_stats": {"backbone": {}}}
  for prefix, kind, path, args in layers:
    t = {k[len(prefix) + 1:]: state[k] for k in state if k.startswith(prefix + ".")
         and "." not in k[len(prefix) + 1:]}
    for col, leaves in _to_flax(kind, args, t).items():
      for name, value in leaves.items():
        _set(variables[col]["backbone"], path + (name,), value)
  if channel_order == "rgb":  # official stem consumes BGR: reverse its input channels
    k = variables["params"]["backbone"]["stem_conv"]["kernel"]
    variables["params"]["backbone"]["stem_conv"]["kernel"] = np.ascontiguousarray(k[:, :, ::-1])
  arch["num_classes"] = None
  if margin_state is not None:
    margin = _strip_module(margin_state)
    if "weight" in margin:
      n = np.shape(margin["weight"])[0] if np.ndim(margin["weight"]) == 2 else -1
    else:
      n = -1
    _check(margin, {"weight": (n, arch["embedding_dim"])}, margin_source,
           "expected the official ArcMarginProduct state {'weight': (classes, "
           f"{arch['embedding_dim']})}}")
    variables["params"]["head"] = {"kernel": np.array(margin["weight"], np.float32)}
    arch["num_classes"] = int(n)
  arch["depth"] = depth
  arch["channel_order"] = channel_order
  return variables, arch


def flax_to_torch_state(variables: Tree, channel_order: str = "rgb"
                        ) -> Tuple[Dict[str, Array], Optional[Dict[str, Array]]]:
  """Inverse of torch_state_to_flax: (official net state, margin state or None), numpy.

  channel_order is the order the Flax model consumes; the result consumes BGR like the
  official code.
  """
  _check_order(channel_order)
  params, stats = variables["params"], variables.get("batch_stats", {})
  bb, bstats = params.get("backbone", params), stats.get("backbone", stats)
  stage_sizes = tuple(len([k for k in bb if k.startswith(f"layer{i}_")]) for i in range(1, 5))
  widths = tuple(int(bb[f"layer{i}_0"]["conv1"]["kernel"].shape[-1]) for i in range(1, 5))
  fc = bb["fc"]["kernel"]
  out_hw = int(round(math.sqrt(fc.shape[0] / widths[3])))
  state: Dict[str, Array] = {}
  for prefix, kind, path, args in _layers(stage_sizes, widths, fc.shape[1], out_hw):
    v = {"params": _get(bb, path)}
    if kind == "bn":
      v["batch_stats"] = _get(bstats, path)
    for suffix, value in _to_torch(kind, args, v).items():
      state[f"{prefix}.{suffix}"] = value
  if channel_order == "rgb":
    state["input_layer.0.weight"] = np.ascontiguousarray(state["input_layer.0.weight"][:, ::-1])
  margin = None
  if "head" in params and "backbone" in params:
    margin = {"weight": np.asarray(params["head"]["kernel"], np.float32)}
  return state, margin


def _strip_module(state: Dict[str, Any]) -> Dict[str, Any]:
  """DataParallel checkpoints prefix every key with 'module.'."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


# ---------------------------------------------------------------------------------------
# Files.

_WRAPPER_KEYS = ("net_state_dict", "margin_state_dict", "state_dict", "model_state_dict")


def _unwrap(obj: Any, path: str) -> Dict[str, Any]:
  """A state dict, bare or inside a dict wrapper like {'iters', 'net_state_dict'}."""
  if not isinstance(obj, dict):
    raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state dict or a dict "
                       "with 'net_state_dict'")
  for k in _WRAPPER_KEYS:
    if isinstance(obj.get(k), dict):
      return _unwrap(obj[k], path)
  dicts = [v for v in obj.values() if isinstance(v, dict)]
  if len(dicts) == 1:
    return _unwrap(dicts[0], path)
  if not obj or dicts:
    raise ConvertError(f"{path}: cannot find the state dict (top-level keys: "
                       f"{sorted(map(str, obj))[:8]}); expected {{'net_state_dict': ...}}")
  return {str(k): v for k, v in obj.items() if _is_tensor(v)}


def _is_tensor(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def load_torch_state(path: str) -> Dict[str, Array]:
  """torch.load(weights_only=True) -> {name: numpy array}, with one-line errors."""
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such file; pass the official *_net.ckpt / *_margin.ckpt")
  try:
    import torch  # optional dependency: only needed to read .ckpt files
  except ImportError as e:
    raise ConvertError(f"{path}: reading PyTorch checkpoints needs torch; "
                       "pip install torch==2.13.0") from e
  try:
    with warnings.catch_warnings():  # a plain pickle's protocol: the refusal below says it
      warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
      obj = torch.load(path, weights_only=True, map_location="cpu")
  except Exception as e:  # pickle/zip errors come in many types
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # torch's refusal of a pickle that would run code wraps its reason ("Trying to load
    # unsupported GLOBAL posix.system ...") in paragraphs of advice: keep the reason.
    if lines and lines[0].startswith("Weights only load failed"):
      lines = [l for l in lines[1:]
               if not l.startswith(("Please file", "Check the documentation"))] or lines
    msg = lines[0] if lines else ""
    raise ConvertError(f"{path}: not a PyTorch checkpoint that torch.load(weights_only=True) "
                       f"can read ({type(e).__name__}: {msg[:160]})") from e
  state = _unwrap(obj, path)
  out = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
         for k, v in state.items()}
  for k, v in out.items():  # a corrupted weight would only show as NaN at evaluation
    if v.dtype.kind in "fc" and not np.isfinite(v).all():
      bad = int(v.size - np.isfinite(v).sum())
      raise ConvertError(f"{path}: tensor {k!r} holds {bad} non-finite value(s) (NaN/Inf) of "
                         f"{v.size}; the checkpoint is corrupt, use an intact copy")
  return out


def output_size(input_size: int) -> int:
  """Side of the last stage: four 3x3, stride-2, padding-1 convs (112 -> 7, 56 -> 4)."""
  for _ in range(4):
    input_size = (input_size - 1) // 2 + 1
  return input_size


def make_spec(arch: Dict[str, Any], source: str, input_size: int | None = None,
              s: float = 32.0, m: float = 0.5) -> Dict[str, Any]:
  """The model.json of the export. input_size defaults to 16 * (side of the last stage)."""
  input_size = input_size or int(arch["out_hw"]) * 16
  if output_size(input_size) != arch["out_hw"]:
    raise ConvertError(f"--input_size={input_size} gives a {output_size(input_size)}x"
                       f"{output_size(input_size)} last stage, but output_layer.3 expects "
                       f"{arch['out_hw']}x{arch['out_hw']}; pass the size the net was trained at")
  return {"task": "facerec", "arch": "iresnet_cbam", "depth": arch["depth"],
          "width": float(arch["width"]), "stage_sizes": [int(n) for n in arch["stage_sizes"]],
          "embedding_dim": int(arch["embedding_dim"]), "num_classes": arch["num_classes"],
          "margin": "arcface", "s": s, "m": m, "input_size": int(input_size),
          "channel_order": arch["channel_order"], "source": source}


def convert(net: str, out: str, margin: str | None = None, depth: int | None = None,
            width: float | None = None, channel_order: str = "rgb", overwrite: bool = False,
            input_size: int | None = None) -> Dict[str, Any]:
  """Read, map, check and export; returns the written spec."""
  from askd_jax.train import checkpoint  # orbax: only needed to write

  from askd_jax.tools.paths import check_output
  if depth is not None and depth not in STAGE_SIZES:
    raise ConvertError(f"--depth={depth} is not one of {sorted(STAGE_SIZES)}")
  check_output("--out", out, directory=True)  # before reading the checkpoint
  if os.path.exists(os.path.join(out, "variables")) and not overwrite:
    raise ConvertError(f"{os.path.abspath(out)} already holds a model; choose another --out "
                       "or pass --overwrite to replace it")
  net = os.path.abspath(net)
  margin = os.path.abspath(margin) if margin else None
  variables, arch = torch_state_to_flax(
      load_torch_state(net), load_torch_state(margin) if margin else None,
      stage_sizes=STAGE_SIZES[depth] if depth is not None else None, width=width,
      channel_order=channel_order, source=net, margin_source=margin or "")
  spec = dict(make_spec(arch, net, input_size), margin_source=margin)
  try:
    checkpoint.export_model(out, variables, spec, overwrite=overwrite)
  except FileExistsError as e:
    raise ConvertError(str(e)) from e
  return spec


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m askd_jax.tools.convert",
                              description=__doc__.split("\n")[0])
  p.add_argument("--net", required=True, help="official *_net.ckpt")
  p.add_argument("--margin", default=None, help="official *_margin.ckpt (ArcFace weight)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--depth", type=int, default=None, choices=sorted(STAGE_SIZES),
                 help="expected depth (default: inferred from the checkpoint)")
  p.add_argument("--width", type=float, default=None,
                 help="expected width multiplier (default: inferred)")
  p.add_argument("--channel_order", default="rgb", choices=CHANNEL_ORDERS,
                 help="input order of the converted model (official nets consume bgr)")
  p.add_argument("--input_size", type=int, default=None,
                 help="input side the net expects (default: 16 x last-stage side, 112)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = p.parse_args(argv)
  from askd_jax.tools.paths import OutputPathError
  try:
    spec = convert(args.net, args.out, args.margin, args.depth, args.width,
                   args.channel_order, args.overwrite, args.input_size)
  except ConvertError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  except OutputPathError as e:  # not writable: a run-time failure, as in the other tools
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.abspath(args.out)}: iresnet_cbam depth={spec['depth']} "
        f"width={spec['width']} stage_sizes={spec['stage_sizes']} "
        f"classes={spec['num_classes']} channel_order={spec['channel_order']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
