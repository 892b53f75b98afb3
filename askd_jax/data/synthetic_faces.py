"""A generated face-detection data set for the offline detection demo (no download).

Each image is a textured background (two-colour gradient + low-frequency noise + stripes)
with 1..max_faces faces at random, non-overlapping boxes, plus 0-3 distractors (plain
ellipses, rectangles and bars in random colours: a face is not "any blob"). A face is
either drawn (`kind='drawn'`: a skin-tone ellipse with hair, eyes, brows, nose and mouth)
or one of the project's ORL photographs (`kind='orl'`: askd_jax.data.orl.read_photo,
resized into the box and blended in with a soft elliptical mask). The box of a face is
the x1, y1, x2, y2 pixel extent of its ellipse / photo; faces are taller than wide
(h / w in [1.1, 1.5], around TinaFace's anchor ratio 1.3).

Everything is a function of (seed, split, index): record i is rendered from
`np.random.default_rng([seed, split_id, i])` at 2x supersampling and box-filtered down
(antialiased edges), on demand: `SyntheticFaces` is a random-access in-memory source for
grain (nothing is written to disk). A record holds
  image  (S, S, 3) uint8
  boxes  (max_boxes, 4) float32 x1, y1, x2, y2 in pixels, zero rows after the faces
  valid  (max_boxes,) bool
  label  int32: the record index (a per-image id; only HORKD's group term reads labels)
`ground_truth()` gives the evaluator's ImageGT list: every face is in the easy, medium and
hard keep lists (no ignore regions), so the three WIDER FACE APs coincide.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from askd_jax.evaluate.widerface import DIFFICULTIES, ImageGT

SEED = 20221010
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLE = 2
KINDS = ("drawn", "orl")
SKIN = np.array([[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66],
                 [141, 85, 36], [255, 205, 148], [234, 192, 134]], np.float64)


@dataclasses.dataclass(frozen=True)
class FaceSpec:
  """What a split looks like (all sizes in output pixels)."""
  image_size: int = 128
  max_faces: int = 6              # faces per image: uniform in 1..max_faces
  min_face: int = 16              # face width range; height = width * U(1.1, 1.5)
  max_face: int = 48
  kind: str = "drawn"             # drawn | orl
  seed: int = SEED

  def check(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"synthetic faces kind={self.kind!r} is unknown; use one of {KINDS}")
    if not 8 <= self.min_face <= self.max_face:
      raise ValueError(f"synthetic faces: need 8 <= min_face <= max_face, got "
                       f"{self.min_face}, {self.max_face}")
    if 1.5 * self.max_face >= self.image_size:
      raise ValueError(f"synthetic faces: max_face={self.max_face} (height up to 1.5x) does not "
                       f"fit image_size={self.image_size}; lower max_face or raise image_size")
    if self.max_faces < 1:
      raise ValueError(f"synthetic faces: max_faces={self.max_faces} must be >= 1")


def _background(rng: np.random.Generator, n: int, k: int) -> Image.Image:
  """(n k, n k) RGB texture: gradient between two colours + smooth noise + a few stripes.

  Built at the output size n (cheap) and up-sampled to the supersampled canvas.
  """
  c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
  t = np.linspace(0.0, 1.0, n, dtype=np.float32)
  ang = rng.uniform(0, 2 * math.pi)
  g = np.float32(math.cos(ang)) * t[None, :] + np.float32(math.sin(ang)) * t[:, None]
  g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
  img = c0 + (c1 - c0) * g[..., None]                                # (n, n, 3)
  cells = int(rng.integers(3, 9))
  noise = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
  noise = np.stack([np.asarray(Image.fromarray(noise[..., c]).resize((n, n), Image.BILINEAR))
                    for c in range(3)], -1)
  img += np.float32(rng.uniform(10, 40)) * noise
  img += rng.normal(0, 6, (n, n, 3)).astype(np.float32)
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((n * k, n * k),
                                                                       Image.BILINEAR)
  d = ImageDraw.Draw(pil)
  for _ in range(int(rng.integers(0, 5))):                          # stripes
    xy = (rng.uniform(0, n, 4) * k).tolist()
    d.line(xy, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)),
           width=int(rng.integers(1, max(2, n // 40))) * k)
  return pil


def _place(rng: np.random.Generator, spec: FaceSpec, count: int) -> List[Tuple[float, ...]]:
  """Up to `count` non-overlapping boxes (x1, y1, x2, y2) in output pixels."""
  s = spec.image_size
  boxes: List[Tuple[float, ...]] = []
  for _ in range(count * 20):
    if len(boxes) == count:
      break
    w = rng.uniform(spec.min_face, spec.max_face)
    h = w * rng.uniform(1.1, 1.5)
    x1, y1 = rng.uniform(0, s - w), rng.uniform(0, s - h)
    b = (x1, y1, x1 + w, y1 + h)
    gap = 0.1 * w
    if all(b[0] > o[2] + gap or b[2] < o[0] - gap or b[1] > o[3] + gap or b[3] < o[1] - gap
           for o in boxes):
      boxes.append(b)
  return boxes


def _draw_face(d: ImageDraw.ImageDraw, rng: np.random.Generator, box) -> None:
  """A cartoon face filling the ellipse inscribed in `box` (supersampled pixels)."""
  x1, y1, x2, y2 = box
  w, h = x2 - x1, y2 - y1
  cx = (x1 + x2) / 2
  skin = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.85, 1.1)
  skin = tuple(int(v) for v in np.clip(skin, 0, 255))
  hair = tuple(int(v) for v in rng.uniform(0, 90, 3))
  dark = tuple(int(v) for v in rng.uniform(0, 50, 3))
  d.ellipse([x1, y1, x2, y2], fill=hair)                           # hair = back of the head
  top = y1 + h * rng.uniform(0.12, 0.3)                             # hairline
  d.ellipse([x1 + 0.04 * w, top, x2 - 0.04 * w, y2], fill=skin)
  ey = y1 + h * rng.uniform(0.42, 0.5)
  er = max(w * rng.uniform(0.06, 0.09), 1.0)
  dx = w * rng.uniform(0.17, 0.22)
  for sx in (-1, 1):
    ex = cx + sx * dx
    d.ellipse([ex - 1.4 * er, ey - er, ex + 1.4 * er, ey + er], fill=(245, 245, 245))
    d.ellipse([ex - 0.7 * er, ey - 0.7 * er, ex + 0.7 * er, ey + 0.7 * er], fill=dark)
    d.line([ex - 1.6 * er, ey - 2.2 * er, ex + 1.6 * er, ey - 2.4 * er], fill=hair,
           width=max(1, int(er * 0.7)))
  ny = y1 + h * 0.64
  d.line([cx, ey + er, cx - 0.05 * w, ny, cx + 0.03 * w, ny], fill=dark, width=max(1, int(er * 0.4)))
  my = y1 + h * rng.uniform(0.74, 0.8)
  mw = w * rng.uniform(0.15, 0.25)
  d.chord([cx - mw, my - 0.06 * h, cx + mw, my + 0.06 * h], 0, 180, fill=(150, 40, 50))


@functools.lru_cache(maxsize=None)
def _orl_photos() -> np.ndarray:
  from askd_jax.data import orl
  return np.stack([orl.read_photo(p, k) for p in range(1, orl.NUM_PEOPLE + 1)
                   for k in range(1, orl.PHOTOS_PER_PERSON + 1)])  # (400, 112, 92)


def _paste_orl(canvas: Image.Image, rng: np.random.Generator, box) -> None:
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  w, h = max(x2 - x1, 1), max(y2 - y1, 1)
  photos = _orl_photos()
  gray = photos[rng.integers(len(photos))]
  tint = rng.uniform(0.75, 1.15, 3)
  rgb = np.clip(gray[..., None].astype(np.float64) * tint, 0, 255).astype(np.uint8)
  face = Image.fromarray(rgb).resize((w, h), Image.BILINEAR)
  mask = Image.new("L", (w, h), 0)
  ImageDraw.Draw(mask).ellipse([0, 0, w - 1, h - 1], fill=255)
  mask = mask.filter(ImageFilter.GaussianBlur(max(w, h) / 30))
  canvas.paste(face, (x1, y1), mask)


def _distractor(d: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> None:
  w, h = rng.uniform(0.06, 0.3, 2) * n
  x, y = rng.uniform(0, n - w), rng.uniform(0, n - h)
  colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
  shape = rng.integers(3)
  if shape == 0:
    d.ellipse([x, y, x + w, y + h], fill=colour)
  elif shape == 1:
    d.rectangle([x, y, x + w, y + h], fill=colour)
  else:
    d.line([x, y, x + w, y + h], fill=colour, width=max(1, int(min(w, h) / 4)))


def render(index: int, split: str = "train", spec: FaceSpec = FaceSpec()
           ) -> Tuple[np.ndarray, np.ndarray]:
  """Record `index` of `split`: (image (S, S, 3) uint8, boxes (n, 4) float32 x1y1x2y2)."""
  if split not in SPLIT_IDS:
    raise ValueError(f"synthetic faces split={split!r} is unknown; use {sorted(SPLIT_IDS)}")
  rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], int(index)])
  s, k = spec.image_size, SUPERSAMPLE
  canvas = _background(rng, s, k)
  d = ImageDraw.Draw(canvas)
  boxes = _place(rng, spec, int(rng.integers(1, spec.max_faces + 1)))
  # Distractors first: faces are drawn over them, so a face box never hides under clutter.
  for _ in range(int(rng.integers(0, 4))):
    _distractor(d, rng, s * k)
  for b in boxes:
    sb = tuple(v * k for v in b)
    if spec.kind == "drawn":
      _draw_face(d, rng, sb)
    else:
      _paste_orl(canvas, rng, sb)
  img = np.asarray(canvas.resize((s, s), Image.BOX), np.uint8)
  return img, np.asarray(boxes, np.float32).reshape(-1, 4)


def pad_boxes(boxes: np.ndarray, max_boxes: int) -> Tuple[np.ndarray, np.ndarray]:
  """(n, 4) -> ((max_boxes, 4) zero-padded, (max_boxes,) valid); n must fit."""
  n = len(boxes)
  if n > max_boxes:
    raise ValueError(f"{n} boxes do not fit max_boxes={max_boxes}; raise data.max_boxes")
  out = np.zeros((max_boxes, 4), np.float32)
  out[:n] = boxes
  return out, np.arange(max_boxes) < n


class SyntheticFaces:
  """Random-access source of `num` generated records of `split` (see the module doc)."""

  def __init__(self, split: str, num: int, spec: FaceSpec = FaceSpec(), max_boxes: int = 8,
               cache: bool = True):
    spec.check()
    if num <= 0:
      raise ValueError(f"synthetic faces: num={num} records must be > 0")
    if max_boxes < spec.max_faces:
      raise ValueError(f"synthetic faces: max_boxes={max_boxes} < max_faces={spec.max_faces}; "
                       "raise data.max_boxes")
    self.split, self.num, self.spec, self.max_boxes = split, int(num), spec, int(max_boxes)
    # Rendering costs ~10-20 ms; a demo epoch revisits records, so keep them (S*S*3 bytes each).
    self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

  def _render(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
    if self._cache is None:
      return render(index, self.split, self.spec)
    if index not in self._cache:
      self._cache[index] = render(index, self.split, self.spec)
    return self._cache[index]

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num:
      raise IndexError(f"index {index} out of range for {self.num} records")
    img, boxes = self._render(index)
    padded, valid = pad_boxes(boxes, self.max_boxes)
    return {"image": img.copy(), "boxes": padded, "valid": valid, "label": np.int32(index)}

  def name(self, index: int) -> str:
    return f"synthetic_{self.split}/{index:06d}"

  def ground_truth(self) -> List[ImageGT]:
    """Evaluator ground truth: x, y, w, h boxes, every face kept in every difficulty."""
    out = []
    for i in range(self.num):
      _, b = self._render(i)
      xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).astype(np.float64)
      keep = {d: np.arange(len(b)) for d in DIFFICULTIES}
      out.append(ImageGT(self.name(i), xywh, keep))
    return out

  def __repr__(self) -> str:
    return f"SyntheticFaces({self.split!r}, num={self.num}, {self.spec})"
