"""Detection input: WIDER FACE / generated-face sources and their per-example transforms.

Training records: {'image': uint8 (S, S, 3), 'boxes': float32 (G, 4) x1y1x2y2 pixels,
'valid': bool (G,), 'label': int32}. `WiderTrainTransform` is TinaFace's training chain
(RandomSquareCrop, resize, flip); `letterbox` fits a validation image into the square
evaluation canvas. `load_detection_data` builds both splits from `config.data`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Sequence, Tuple

import grain.python as grain
import numpy as np
from PIL import Image

from askd_jax.evaluate.widerface import DIFFICULTIES, ImageGT

PAD_VALUE = 128  # letterbox padding: grey, 0 after the [-1, 1] scaling


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
  if img.shape[1] == w and img.shape[0] == h:
    return img
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def keep_largest(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
  """At most max_boxes rows, the largest by area (file order kept among them)."""
  if len(boxes) <= max_boxes:
    return boxes
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  idx = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
  return boxes[idx]


def pad_boxes(boxes: np.ndarray, max_boxes: int) -> Tuple[np.ndarray, np.ndarray]:
  out = np.zeros((max_boxes, 4), np.float32)
  n = min(len(boxes), max_boxes)
  out[:n] = boxes[:n]
  return out, np.arange(max_boxes) < n


def flip_boxes(boxes: np.ndarray, valid: np.ndarray, width: int) -> np.ndarray:
  """Mirror x1y1x2y2 boxes in an image of `width` (padding rows stay zero)."""
  out = boxes.copy()
  out[:, 0] = width - boxes[:, 2]
  out[:, 2] = width - boxes[:, 0]
  return np.where(valid[:, None], out, 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RandomFlipBoxes(grain.RandomMapTransform):
  """Horizontal flip of image and boxes with probability p."""
  p: float = 0.5

  def random_map(self, record, rng: np.random.Generator):
    if rng.random() >= self.p:
      return record
    img = np.ascontiguousarray(np.asarray(record["image"])[:, ::-1])
    boxes = flip_boxes(np.asarray(record["boxes"], np.float32), np.asarray(record["valid"]),
                       img.shape[1])
    return {**record, "image": img, "boxes": boxes}


def random_square_crop(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                       crop_choice: Sequence[float], max_tries: int = 50
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """TinaFace's RandomSquareCrop: a square of side scale * short side (scale from
  crop_choice) at a random position; faces whose centre falls inside are kept, shifted and
  clipped. Tries again (up to max_tries) while no face survives; then keeps the last crop.
  """
  h, w = img.shape[:2]
  for _ in range(max_tries):
    side = max(int(min(h, w) * float(rng.choice(np.asarray(crop_choice)))), 1)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx > x0) & (cx < x0 + side) & (cy > y0) & (cy < y0 + side)
    if inside.any() or len(boxes) == 0:
      break
  b = boxes[inside] - np.array([x0, y0, x0, y0], np.float32)
  b = np.clip(b, 0, side).astype(np.float32)
  return img[y0:y0 + side, x0:x0 + side], b


@dataclasses.dataclass(frozen=True)
class WiderTrainTransform(grain.RandomMapTransform):
  """A WIDER FACE record (askd_wider_face 'train') -> a fixed-size training record.

  decode -> RandomSquareCrop -> resize to size x size -> flip; trains on the faces marked
  valid (not 'invalid', w, h > 0; the others are dropped, as vedadet's ignore boxes are
  unused by its assigner); at most max_boxes faces, the largest ones.
  """
  size: int = 640
  max_boxes: int = 400
  crop_choice: Tuple[float, ...] = (0.3, 0.45, 0.6, 0.8, 1.0)
  flip: bool = True

  def random_map(self, record, rng: np.random.Generator):
    from askd_jax.data.widerface import decode_image
    img = decode_image(record["image"])
    xywh = np.asarray(record["faces/bbox"], np.float32).reshape(-1, 4)
    valid = np.asarray(record["faces/valid"], bool).reshape(-1)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)[valid]
    img, boxes = random_square_crop(img, boxes, rng, self.crop_choice)
    s = self.size / img.shape[0]
    img = _resize(img, self.size, self.size)
    boxes = keep_largest(boxes * s, self.max_boxes)
    padded, ok = pad_boxes(boxes, self.max_boxes)
    if self.flip and rng.random() < 0.5:
      img = np.ascontiguousarray(img[:, ::-1])
      padded = flip_boxes(padded, ok, self.size)
    return {"image": img, "boxes": padded, "valid": ok,
            "label": np.int32(record.get("image/id", 0))}


def letterbox(img: np.ndarray, size: int, pad_value: int = PAD_VALUE
              ) -> Tuple[np.ndarray, float]:
  """Longer side -> size (aspect kept), pad bottom/right: ((size, size, 3) uint8, scale)."""
  h, w = img.shape[:2]
  scale = size / max(h, w)
  nw, nh = max(int(round(w * scale)), 1), max(int(round(h * scale)), 1)
  out = np.full((size, size, 3), pad_value, np.uint8)
  out[:nh, :nw] = _resize(img, nw, nh)
  return out, scale


def load_detection_data(dcfg) -> Dict[str, Any]:
  """{'train': source, 'train_transforms': [...], 'val': callable -> iterator of
  (name, image uint8 (H, W, 3), ImageGT), 'num_val': int, 'set': row prefix, and for a
  prepared set 'val_dir': its builder directory}."""
  name = dcfg.name
  size, max_boxes = int(dcfg.image_size), int(dcfg.max_boxes)
  if name == "synthetic":
    from askd_jax.data import synthetic_faces as sf
    spec = sf.FaceSpec(image_size=size, max_faces=int(dcfg.max_faces),
                       min_face=int(dcfg.min_face), max_face=int(dcfg.max_face),
                       kind=dcfg.get("kind", "drawn"), seed=int(dcfg.get("synthetic_seed", sf.SEED)))
    train = sf.SyntheticFaces("train", int(dcfg.num_train), spec, max_boxes)
    val = sf.SyntheticFaces("val", int(dcfg.num_val), spec, max_boxes)

    def val_items() -> Iterator[Tuple[str, np.ndarray, ImageGT]]:
      for i in range(len(val)):
        r = val[i]
        b = r["boxes"][r["valid"]].astype(np.float64)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        yield val.name(i), r["image"], ImageGT(val.name(i), xywh,
                                                {d: np.arange(len(b)) for d in DIFFICULTIES})

    transforms = [RandomFlipBoxes()] if dcfg.get("flip", True) else []
    return {"train": train, "train_transforms": transforms, "val": val_items,
            "num_val": len(val), "set": "synthetic"}
  if name == "widerface":
    import os
    from askd_jax.data import widerface
    from askd_jax.data.prepared import resolve_data_dir
    data_dir = resolve_data_dir(dcfg.get("data_dir"))
    manual = dcfg.get("manual_dir")
    if manual and not os.path.isdir(os.path.expanduser(manual)):
      raise FileNotFoundError(f"config.data.manual_dir={manual!r} does not exist; point it at "
                              "the folder with the released WIDER FACE files")
    b = (widerface.prepare(os.path.expanduser(manual), data_dir) if manual
         else widerface.WiderFace(data_dir=data_dir))
    missing = [s for s in ("train", "validation") if s not in b.info.splits]
    if missing:
      raise FileNotFoundError(f"{b.data_dir}: askd_wider_face has no {missing} split; prepare it "
                              "with --config.data.manual_dir=<folder with WIDER_train, WIDER_val, "
                              "wider_face_split and eval_tools> (see docs/widerface.md)")
    train, val = b.as_data_source("train"), b.as_data_source("validation")

    def val_items() -> Iterator[Tuple[str, np.ndarray, ImageGT]]:
      for i in range(len(val)):
        r = val[i]
        gt = widerface.gt_from_example(r)
        yield gt.name, widerface.decode_image(r["image"]), gt

    transforms = [WiderTrainTransform(size, max_boxes, tuple(dcfg.crop_choice),
                                      dcfg.get("flip", True))]
    return {"train": train, "train_dir": b.data_dir, "train_transforms": transforms,
            "val": val_items, "num_val": len(val), "set": "widerface", "val_dir": b.data_dir}
  raise ValueError(f"config.data.name={name!r} is unknown for detection; use widerface or "
                   "synthetic")
