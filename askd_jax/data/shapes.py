"""A synthetic 10-class shape data set for the offline classification demo (no download).

Each image holds one shape (the class) at a random position, size, rotation and colour on
a noisy two-tone gradient background, with 0-3 small distractor dots. Several classes
differ only in a detail a few pixels wide at 8 px (4x down-sampling): a ring, a frame and
a crescent are a disc or a square with a hole or a bite, a pair is two discs a gap apart,
a star and a cross differ in their arms. At 32 px these are plain; at 8 px they blur into
blobs, so low resolution really hurts and knowing *where* the object is and which detail
matters (the teacher's attention) is worth something.

Everything is a function of (split, index): record i of a split is rendered from
`np.random.default_rng([SEED, split_id, i])` at 4x supersampling and box-filtered down
(antialiased edges), then stored PNG-encoded, like ImageNet's JPEGs, so the demo runs the
same decode + crop transforms as the real data. Labels are balanced (i % 10).
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Dict, Iterator, List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from askd_jax.data.prepared import prepare_once, resolve_data_dir

CLASSES = ("disc", "ring", "triangle", "square", "frame", "star", "cross", "bar", "pair",
           "crescent")
SEED = 20220807
SPLIT_IDS = {"train": 0, "test": 1}
SUPERSAMPLE = 4


def _polygon(n: int, r: float, rot: float, cx: float, cy: float) -> List[Tuple[float, float]]:
  return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
          for k in range(n)]


def _rotated(points, rot: float, cx: float, cy: float):
  c, s = math.cos(rot), math.sin(rot)
  return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_shape(d: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, r: float, rot: float,
                color, bg) -> None:
  """One shape of radius ~r centred at (cx, cy), in supersampled pixels."""
  disc = lambda x, y, rr, fill: d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)
  if cls == "disc":
    disc(cx, cy, r, color)
  elif cls == "ring":  # a disc with a hole: the hole is what low resolution erases
    disc(cx, cy, r, color)
    disc(cx, cy, 0.55 * r, bg)
  elif cls in ("triangle", "square"):
    d.polygon(_polygon(3 if cls == "triangle" else 4, r, rot, cx, cy), fill=color)
  elif cls == "frame":  # a square outline
    d.polygon(_polygon(4, r, rot, cx, cy), fill=color)
    d.polygon(_polygon(4, 0.55 * r, rot, cx, cy), fill=bg)
  elif cls == "star":
    pts = [(r * (1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5),
            r * (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5)) for k in range(10)]
    d.polygon(_rotated(pts, rot, cx, cy), fill=color)
  elif cls == "cross":
    a, b = r, 0.3 * r
    for pts in ([(-a, -b), (a, -b), (a, b), (-a, b)], [(-b, -a), (b, -a), (b, a), (-b, a)]):
      d.polygon(_rotated(pts, rot, cx, cy), fill=color)
  elif cls == "bar":
    a, b = r, 0.3 * r
    d.polygon(_rotated([(-a, -b), (a, -b), (a, b), (-a, b)], rot, cx, cy), fill=color)
  elif cls == "pair":  # two discs a small gap apart
    (x0, y0), (x1, y1) = _rotated([(-0.55 * r, 0.0), (0.55 * r, 0.0)], rot, cx, cy)
    disc(x0, y0, 0.42 * r, color)
    disc(x1, y1, 0.42 * r, color)
  elif cls == "crescent":
    disc(cx, cy, r, color)
    (x, y), = _rotated([(0.45 * r, 0.0)], rot, cx, cy)
    disc(x, y, 0.8 * r, bg)
  else:
    raise ValueError(f"unknown shape class {cls!r}; classes are {CLASSES}")


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 0.0):
  for _ in range(100):
    c = rng.integers(0, 256, 3)
    if avoid is None or np.abs(c - avoid).sum() >= min_dist:
      return c
  return 255 - avoid


def render(index: int, split: str = "train", size: int = 32) -> Tuple[np.ndarray, int]:
  """Record `index` of `split`: ((size, size, 3) uint8, label)."""
  if split not in SPLIT_IDS:
    raise ValueError(f"split={split!r}: use one of {sorted(SPLIT_IDS)}")
  rng = np.random.default_rng([SEED, SPLIT_IDS[split], int(index)])
  label = int(index) % len(CLASSES)
  s = size * SUPERSAMPLE
  # Background: a linear gradient between two muted colours.
  c0, c1 = rng.integers(40, 216, 3), rng.integers(40, 216, 3)
  ang = rng.uniform(0, 2 * math.pi)
  yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
  t = (np.cos(ang) * xx + np.sin(ang) * yy)
  t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
  bg = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
  im = Image.fromarray(bg)
  d = ImageDraw.Draw(im)
  mean_bg = (c0 + c1) / 2
  # The object: radius 20-40 % of the side, fully inside the image.
  r = rng.uniform(0.20, 0.40) * s
  cx, cy = rng.uniform(r, s - r, 2)
  color = tuple(int(v) for v in _colour(rng, mean_bg, 180))
  _draw_shape(d, CLASSES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), color,
              tuple(int(v) for v in bg[int(cy), int(cx)]))
  # Distractors: small dots (radius < 1/4 of the smallest object).
  for _ in range(int(rng.integers(0, 4))):
    dr = rng.uniform(0.03, 0.05) * s
    dx, dy = rng.uniform(dr, s - dr, 2)
    dc = tuple(int(v) for v in _colour(rng, mean_bg, 120))
    d.ellipse([dx - dr, dy - dr, dx + dr, dy + dr], fill=dc)
  small = np.asarray(im.resize((size, size), Image.BOX), np.float32)
  small += rng.normal(0, 8.0, small.shape)  # sensor noise
  return np.clip(np.rint(small), 0, 255).astype(np.uint8), label


def encode_png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 5000
  num_test: int = 1000


def _config(size: int, num_train: int = 5000, num_test: int = 1000) -> ShapesConfig:
  return ShapesConfig(name=f"px{size}_{num_train}_{num_test}", image_size=size,
                      num_train=num_train, num_test=num_test,
                      description=f"{size} px, {num_train} train / {num_test} test images")


class AskdShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes, 10 classes, generated (nothing is downloaded)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "10 shapes on gradient backgrounds with distractor dots.",
                   "1.1.0": "Classes whose difference low resolution erases (ring, frame, pair, "
                            "crescent) instead of pentagon / hexagon / semicircle."}
  BUILDER_CONFIGS = [_config(32)]
  DEFAULT_CONFIG_NAME = "px32_5000_1000"

  def __init__(self, *, image_size: int | None = None, num_train: int = 5000,
               num_test: int = 1000, **kwargs):
    if image_size is not None:
      if not isinstance(image_size, int) or not 16 <= image_size <= 256:
        raise ValueError(f"shapes image_size={image_size!r}: must be an int in [16, 256]")
      if num_train < len(CLASSES) or num_test < len(CLASSES):
        raise ValueError(f"shapes num_train={num_train}, num_test={num_test}: each must be at "
                         f"least {len(CLASSES)} (one image per class)")
      known = {c.name for c in self.BUILDER_CONFIGS}
      cfg = _config(image_size, num_train, num_test)
      kwargs["config"] = cfg.name if cfg.name in known else cfg
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, n: int) -> Iterator[Tuple[int, Dict]]:
    size = self.builder_config.image_size
    for i in range(n):
      img, label = render(i, split, size)
      yield i, {"image": encode_png(img), "label": label}


def prepare(data_dir: str | None = None, image_size: int = 32, num_train: int = 5000,
            num_test: int = 1000) -> AskdShapes:
  """The prepared builder; generates the array_record files on first use (seconds)."""
  data_dir = resolve_data_dir(data_dir)
  kw = dict(image_size=image_size, num_train=num_train, num_test=num_test, data_dir=data_dir)
  name = AskdShapes(**kw).builder_config.name
  return prepare_once(lambda: AskdShapes(**kw), data_dir, f".askd_shapes_{name}.lock")
