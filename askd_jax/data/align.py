"""5-point face alignment to insightface's 112x112 ArcFace template.

    crop = align_face(image, landmarks)            # uint8 (H, W, 3) + (5, 2) -> (112, 112, 3)
    entries = read_landmarks("landmarks.txt")      # [Landmarks(name, points, score, line)]

What insightface does (python-package/insightface/utils/face_align.py, `estimate_norm` +
`norm_crop`, and recognition/_evaluation_/ijb's `Embedding.get`): the least-squares
similarity transform (rotation, uniform scale, translation; no reflection) that maps the five
detected points (left eye, right eye, nose tip, left and right mouth corners, in image pixels)
onto `ARCFACE_TEMPLATE`, then a bilinear warp of the image into a 112x112 crop, pixels that
fall outside the image set to 0. Sizes that are multiples of 112 scale the template.

Library: scikit-image (pinned in requirements.txt; the runtime needs it because
`python -m askd_jax.data.prepare --dataset=ijbc` and `tools.align`/`tools.embed --landmarks`
align at run time). Its `SimilarityTransform.from_estimate` is the estimator insightface
calls (Umeyama's closed form), and `skimage.transform.warp(order=1, mode='constant', cval=0)`
is its bilinear warp. insightface warps with OpenCV's `cv2.warpAffine`; the two differ by at
most one grey level (OpenCV's fixed-point interpolation weights), which
tests/test_align.py checks. OpenCV is not used at run time: its similarity estimator
(`estimateAffinePartial2D`) is robust (RANSAC/LMedS + refinement), not insightface's plain least
squares (on noisy landmarks its matrix differs by ~1e-3), and one library is enough.

Landmark file format (`read_landmarks`; insightface's `ijbc_name_5pts_score.txt` is one):
one face per line, whitespace-separated,

    NAME x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [SCORE]

NAME: the image's path relative to the image folder; x/y in the image's pixels (x right,
y down, pixel centres at integers, as OpenCV); points in the order left eye, right eye, nose,
left mouth corner, right mouth corner (left/right as seen in the image); SCORE: the face
detector's confidence (optional unless the caller needs it). Blank lines and lines starting
with '#' are skipped.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional

import numpy as np

# insightface's arcface_dst (face_align.py): the five points' places in a 112x112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
LANDMARK_FORMAT = "NAME x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [SCORE]"


class LandmarkError(ValueError):
  """A landmark file line that cannot be used (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Landmarks:
  name: str            # image path relative to the image folder
  points: np.ndarray   # (5, 2) float32, image pixels
  score: float         # detector score; nan when the line has none
  line: int            # 1-based line number in the file, for error messages


def template(size: int = 112) -> np.ndarray:
  """The (5, 2) template for a size x size crop (a multiple of 112, as insightface)."""
  if size <= 0 or size % 112:
    raise ValueError(f"size={size}: the ArcFace template is defined for multiples of 112")
  return ARCFACE_TEMPLATE * np.float32(size / 112)


def similarity_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
  """(3, 3) similarity transform taking image pixels to crop pixels (least squares)."""
  from skimage.transform import SimilarityTransform  # pylint: disable=g-import-not-at-top
  pts = np.asarray(landmarks, dtype=np.float32)
  if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
    raise ValueError(f"landmarks: need 5 finite (x, y) points, got shape {pts.shape}")
  tform = SimilarityTransform.from_estimate(pts, template(size))
  if not tform or not np.all(np.isfinite(tform.params)):
    raise ValueError("landmarks: degenerate (the five points coincide); cannot estimate a "
                     "similarity transform")
  return tform.params


def warp(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
  """uint8 (H, W, C) image -> (size, size, C): bilinear, border 0, rounded to uint8."""
  from skimage.transform import warp as sk_warp  # pylint: disable=g-import-not-at-top
  img = np.asarray(image)
  out = sk_warp(img, np.linalg.inv(matrix), output_shape=(size, size), order=1,
                mode="constant", cval=0.0, preserve_range=True)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
  """A uint8 (H, W, 3) photo + its 5 points -> the aligned (size, size, 3) ArcFace crop."""
  img = np.asarray(image)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"image: need uint8 (H, W, 3), got {img.dtype} {img.shape}")
  return warp(img, similarity_matrix(landmarks, size), size)


def model_crop(image: np.ndarray, landmarks: np.ndarray, input_size: int) -> np.ndarray:
  """The aligned crop at a model's input size: sizes that are not a multiple of 112 are
  aligned at 112 and resized with PIL's bilinear filter, as the prepared 112 px sets are
  decoded for such a model (`faces.decode_image`)."""
  if input_size % 112 == 0:
    return align_face(image, landmarks, input_size)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  crop = Image.fromarray(align_face(image, landmarks, 112))
  return np.asarray(crop.resize((input_size, input_size), Image.BILINEAR), dtype=np.uint8)


def parse_landmark_line(line: str, path: str, line_no: int, require_score: bool = False
                        ) -> Optional[Landmarks]:
  """Line `line_no` of landmark file `path` (None for a blank or '#' line)."""
  where = f"{path} line {line_no}"
  parts = line.split()
  if not parts or parts[0].startswith("#"):
    return None
  values = parts[1:]
  allowed = (11,) if require_score else (10, 11)
  if len(values) not in allowed:
    want = "10 coordinates and a detector score" if require_score else (
        "10 coordinates (x1 y1 ... x5 y5), optionally followed by a detector score")
    raise LandmarkError(f"{where}: {len(values)} values after the name {parts[0]!r}; expected "
                        f"{want} ('{LANDMARK_FORMAT}')")
  try:
    numbers = [float(v) for v in values]
  except ValueError:
    bad = next(v for v in values if not _is_float(v))
    raise LandmarkError(f"{where}: {bad!r} is not a number ('{LANDMARK_FORMAT}')") from None
  if not all(math.isfinite(v) for v in numbers):
    raise LandmarkError(f"{where}: a value is not finite ('{LANDMARK_FORMAT}')")
  points = np.array(numbers[:10], dtype=np.float32).reshape(5, 2)
  score = numbers[10] if len(numbers) == 11 else math.nan
  return Landmarks(parts[0], points, score, line_no)


def _is_float(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False


def read_landmarks(path: str, require_score: bool = False) -> List[Landmarks]:
  """All faces of a landmark file (format in the module docstring), checked line by line.

  Raises FileNotFoundError or LandmarkError, one line naming the file (and line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such landmark file (lines of '{LANDMARK_FORMAT}')")
  out, seen = [], {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      entry = parse_landmark_line(line, path, n, require_score)
      if entry is None:
        continue
      if entry.name in seen:
        raise LandmarkError(f"{path} line {n}: {entry.name} is already listed on line "
                            f"{seen[entry.name]}; list each image once")
      seen[entry.name] = n
      out.append(entry)
  if not out:
    raise LandmarkError(f"{path}: names no face (lines of '{LANDMARK_FORMAT}')")
  return out


def read_photo(path: str) -> np.ndarray:
  """An image file as uint8 (H, W, 3) RGB (PIL; gray and palette images converted)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such image file")
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    msg = str(e).splitlines()[0] if str(e) else ""
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {msg[:120]})") from None


__all__ = ["ARCFACE_TEMPLATE", "LANDMARK_FORMAT", "LandmarkError", "Landmarks", "template",
           "similarity_matrix", "warp", "align_face", "model_crop", "parse_landmark_line", "read_landmarks",
           "read_photo"]
