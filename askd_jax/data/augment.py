"""Per-record augmentations as grain transforms (numpy, on uint8 (H, W, 3) images).

Random ones derive from grain's `RandomMapTransform`: grain hands each record a
`np.random.Generator` seeded from the loader seed and the record's position, so an epoch's
augmentations are a function of the seed alone (and replay exactly after a resume).
Every transform keeps the shape and the uint8 dtype and leaves the other keys alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import grain.python as grain
import numpy as np

Record = Dict[str, Any]


def _image(record: Record) -> np.ndarray:
  img = np.asarray(record["image"])
  if img.dtype != np.uint8 or img.ndim != 3:
    raise ValueError(f"augmentations expect record['image'] uint8 (H, W, C), got "
                     f"{img.dtype} {img.shape}; decode the image before augmenting")
  return img


def hflip(img: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(img[:, ::-1])


def affine_bilinear(img: np.ndarray, scale: float, dx: float, dy: float) -> np.ndarray:
  """Zoom by `scale` about the centre, then shift by (dx, dy) pixels; edge-clamped bilinear.

  Output pixel (y, x) samples the input at c + (p - c - d) / scale (c the centre, d the shift).
  """
  h, w = img.shape[:2]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  ys = cy + (np.arange(h, dtype=np.float32) - cy - dy) / scale  # (H,)
  xs = cx + (np.arange(w, dtype=np.float32) - cx - dx) / scale  # (W,)
  ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
  y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  f = img.astype(np.float32)
  top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
  bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
  out = top * (1 - wy) + bot * wy
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.RandomMapTransform):
  """Horizontal flip with probability `p` (the official training augmentation)."""
  p: float = 0.5

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    img = _image(record)
    if rng.random() < self.p:
      img = hflip(img)
    return {**record, "image": img}


@dataclasses.dataclass(frozen=True)
class RandomShiftScale(grain.RandomMapTransform):
  """Small zoom in [1/max_scale, max_scale] and shift up to `max_shift` of the side."""
  max_shift: float = 0.08
  max_scale: float = 1.1

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    img = _image(record)
    h, w = img.shape[:2]
    scale = float(np.exp(rng.uniform(-np.log(self.max_scale), np.log(self.max_scale))))
    dy, dx = rng.uniform(-self.max_shift, self.max_shift, size=2) * (h, w)
    return {**record, "image": affine_bilinear(img, scale, float(dx), float(dy))}


@dataclasses.dataclass(frozen=True)
class RandomBrightness(grain.RandomMapTransform):
  """Multiply by a factor in [1 - max_delta, 1 + max_delta] (the same for all channels)."""
  max_delta: float = 0.2

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    img = _image(record)
    factor = rng.uniform(1 - self.max_delta, 1 + self.max_delta)
    out = np.clip(np.rint(img.astype(np.float32) * factor), 0, 255).astype(np.uint8)
    return {**record, "image": out}


def official() -> Tuple[grain.RandomMapTransform, ...]:
  """The official recipe's augmentation: random horizontal flip."""
  return (RandomFlip(),)


def demo(max_shift: float = 0.08, max_scale: float = 1.1,
         max_brightness: float = 0.2) -> Tuple[grain.RandomMapTransform, ...]:
  """Flip + small shift/zoom + brightness: 400 photos need more than flips."""
  return (RandomFlip(), RandomShiftScale(max_shift, max_scale), RandomBrightness(max_brightness))


def get(name: str) -> Tuple[grain.RandomMapTransform, ...]:
  """Augmentation by config name: 'none', 'official' or 'flip' (the same), or 'demo'."""
  table = {"none": lambda: (), "official": official, "flip": official, "demo": demo}
  if name not in table:
    raise ValueError(f"augmentation {name!r} is unknown; use one of {sorted(table)}")
  return table[name]()


face_train_transforms = get  # the name the face task calls
