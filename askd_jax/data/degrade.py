"""Low-resolution degradation of [-1, 1] NHWC batches, on device and jit-able.

`official` reproduces the A-SKD code: nearest resize S -> s -> S with PyTorch
`F.interpolate(mode='nearest')` indexing (src = floor(dst * float32(in / out))), then a fixed
5x5 Gaussian blur, sigma 2.0 along the height and 0.1 along the width, reflect padding.
`jax.image.resize(method='nearest')` samples pixel centres (src = floor((dst + 0.5) * in/out))
and picks different pixels, so it is not used here.

Other modes: 'bilinear' / 'bicubic' (antialiased down, same method up), 'area' (exact box
average down, bilinear up); blur 'random' (isotropic sigma ~ U(sigma_range) per sample) or
'none'. A sequence of sizes draws one size per sample; all sizes are static.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("official", "bilinear", "bicubic", "area")
BLURS = ("official", "random", "none")
OFFICIAL_SIGMA = (2.0, 0.1)  # (height, width): torchvision sigma=[0.1, 2.0] is (x, y)
KERNEL_SIZE = 5

Sizes = Union[int, Sequence[int]]


def torch_nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of `F.interpolate(mode='nearest')` along one axis, (out_size,) int32."""
  dst = np.arange(out_size)
  if out_size == in_size:
    return dst.astype(np.int32)
  if out_size == 2 * in_size:
    return (dst >> 1).astype(np.int32)
  scale = np.float32(in_size) / np.float32(out_size)  # float32, as ATen computes it
  src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


def _nearest_roundtrip_index(in_size: int, size: int) -> np.ndarray:
  """Composite index of nearest in -> size -> in: (in_size,)."""
  down = torch_nearest_index(in_size, size)  # (size,) indices into the input
  up = torch_nearest_index(size, in_size)    # (in_size,) indices into the small image
  return down[up]


def gaussian_kernel1d(sigma: jax.Array, size: int = KERNEL_SIZE) -> jax.Array:
  """torchvision's normalised 1-D Gaussian on linspace(-(size-1)/2, (size-1)/2, size).

  sigma: (...,) -> (..., size).
  """
  x = jnp.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / jnp.sum(pdf, axis=-1, keepdims=True)


def _blur_axis(x: jax.Array, k: jax.Array, axis: int) -> jax.Array:
  """Reflect-padded correlation of x (B, H, W, C) with per-sample taps k (B, K) on `axis`."""
  size = k.shape[-1]
  half = size // 2
  pad = [(0, 0)] * 4
  pad[axis] = (half, half)
  xp = jnp.pad(x, pad, mode="reflect")
  n = x.shape[axis]
  out = jnp.zeros_like(x)
  for i in range(size):
    tap = jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
    out = out + k[:, i, None, None, None] * tap
  return out


def gaussian_blur(x: jax.Array, sigma_h: jax.Array, sigma_w: jax.Array) -> jax.Array:
  """Separable 5x5 Gaussian blur, reflect padding; sigmas scalar or per sample (B,).

  Separable == the outer-product 2-D kernel of torchvision up to float rounding.
  """
  b = x.shape[0]
  kh = jnp.broadcast_to(gaussian_kernel1d(sigma_h), (b, KERNEL_SIZE))
  kw = jnp.broadcast_to(gaussian_kernel1d(sigma_w), (b, KERNEL_SIZE))
  return _blur_axis(_blur_axis(x, kh, axis=1), kw, axis=2)


def _area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of exact box averaging (each output pixel averages its footprint)."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    lo, hi = o * scale, (o + 1) * scale
    for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), in_size)):
      m[o, i] = max(0.0, min(hi, i + 1) - max(lo, i))
  return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_roundtrip(x: jax.Array, size: int, mode: str) -> jax.Array:
  """x: (B, H, W, C) -> down to (size, size) -> back to (H, W)."""
  b, h, w, c = x.shape
  if mode == "official":
    ri = jnp.asarray(_nearest_roundtrip_index(h, size))
    ci = jnp.asarray(_nearest_roundtrip_index(w, size))
    return x[:, ri][:, :, ci]
  if mode == "area":
    ah = jnp.asarray(_area_matrix(h, size))
    aw = jnp.asarray(_area_matrix(w, size))
    small = jnp.einsum("oh,bhwc->bowc", ah, x, precision="highest")
    small = jnp.einsum("pw,bowc->bopc", aw, small, precision="highest")
    return jax.image.resize(small, (b, h, w, c), "linear")
  method = {"bilinear": "linear", "bicubic": "cubic"}[mode]
  small = jax.image.resize(x, (b, size, size, c), method, antialias=True)
  return jax.image.resize(small, (b, h, w, c), method)


def _as_sizes(sizes: Sizes) -> Tuple[int, ...]:
  if isinstance(sizes, (int, np.integer)):
    return (int(sizes),)
  out = tuple(int(s) for s in sizes)
  if not out:
    raise ValueError("degrade: sizes is empty; give an int or a non-empty list such as [14, 28].")
  return out


def degrade(images: jax.Array, rng: Optional[jax.Array], sizes: Sizes, *,
            mode: str = "official", blur: str = "official",
            sigma_range: Tuple[float, float] = (0.1, 2.0)) -> jax.Array:
  """Degrade (B, H, W, C) images in [-1, 1]; returns the same shape.

  rng is only needed when `sizes` has several entries or blur == 'random' (may be None
  otherwise). With several sizes each sample draws one uniformly.
  """
  if mode not in MODES:
    raise ValueError(f"degrade: mode {mode!r} unknown; valid: {', '.join(MODES)}.")
  if blur not in BLURS:
    raise ValueError(f"degrade: blur {blur!r} unknown; valid: {', '.join(BLURS)}.")
  if images.ndim != 4:
    raise ValueError(f"degrade: images must be (B, H, W, C), got shape {images.shape}.")
  sizes = _as_sizes(sizes)
  b, h, w, _ = images.shape
  for s in sizes:
    if s < 1 or s > min(h, w):
      raise ValueError(f"degrade: size {s} is not in [1, {min(h, w)}] for input size "
                       f"{h}x{w}; pick sizes no larger than the input.")
  needs_rng = len(sizes) > 1 or blur == "random"
  if needs_rng and rng is None:
    raise ValueError("degrade: rng is None but several sizes or blur='random' need one.")
  k_size, k_blur = jax.random.split(rng) if needs_rng else (None, None)

  x = jnp.asarray(images, jnp.float32)
  if len(sizes) == 1:
    x = _resize_roundtrip(x, sizes[0], mode)
  else:
    choice = jax.random.randint(k_size, (b,), 0, len(sizes))  # (B,)
    if mode == "official":
      # One gather: per-sample composite row/column indices.
      ri = jnp.asarray(np.stack([_nearest_roundtrip_index(h, s) for s in sizes]))[choice]
      ci = jnp.asarray(np.stack([_nearest_roundtrip_index(w, s) for s in sizes]))[choice]
      x = jax.vmap(lambda im, r, c: im[r][:, c])(x, ri, ci)
    else:
      outs = jnp.stack([_resize_roundtrip(x, s, mode) for s in sizes])  # (K, B, H, W, C)
      x = outs[choice, jnp.arange(b)]

  if blur == "official":
    x = gaussian_blur(x, OFFICIAL_SIGMA[0], OFFICIAL_SIGMA[1])
  elif blur == "random":
    lo, hi = sigma_range
    sigma = jax.random.uniform(k_blur, (b,), jnp.float32, lo, hi)
    x = gaussian_blur(x, sigma, sigma)
  if mode == "bicubic":
    x = jnp.clip(x, -1.0, 1.0)  # cubic overshoot
  out_dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
  return x.astype(out_dtype)


def make_degrade(cfg: Mapping[str, Any]) -> Callable[[jax.Array, Optional[jax.Array]], jax.Array]:
  """cfg keys: sizes (int or list; `size` accepted), mode, blur, sigma_range."""
  sizes = cfg.get("sizes", None)
  if sizes is None:
    sizes = cfg.get("size", None)
  if sizes is None:
    raise ValueError("make_degrade: cfg has no 'sizes'; set e.g. sizes=[14] or sizes=[14, 28, 56].")
  sizes = _as_sizes(sizes)
  mode = cfg.get("mode", "official")
  blur = cfg.get("blur", "official")
  sigma_range = tuple(float(v) for v in cfg.get("sigma_range", (0.1, 2.0)))
  if mode not in MODES or blur not in BLURS:
    raise ValueError(f"make_degrade: mode {mode!r} / blur {blur!r}; valid modes "
                     f"{', '.join(MODES)}, blurs {', '.join(BLURS)}.")

  def fn(images: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
    return degrade(images, rng, sizes, mode=mode, blur=blur, sigma_range=sigma_range)

  return fn
