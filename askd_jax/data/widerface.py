"""WIDER FACE as a tfds builder (array_record, no TensorFlow) from the released files.

Manual directory (folders or the released zips, read with zipfile; a path 'A/b/c' is looked
up as <manual_dir>/A/b/c, then as member 'A/b/c' of <manual_dir>/A.zip):

  WIDER_train/images/<event>/<name>.jpg        or WIDER_train.zip
  WIDER_val/images/<event>/<name>.jpg          or WIDER_val.zip
  wider_face_split/wider_face_{train,val}_bbx_gt.txt           or wider_face_split.zip
  eval_tools/ground_truth/wider_{easy,medium,hard}_val.mat     or eval_tools.zip
  (eval_tools/ground_truth/wider_face_val.mat is used for the boxes when present)

A split is built when its images are present; 'validation' also needs the .mat files.

Boxes. The txt gives per face 'x y w h blur expression illumination invalid occlusion pose'.
Every face line is stored as is (x, y, w, h in pixels) with its attributes, in file order,
so indices match the official keep lists. The official evaluation never deletes a box: it
matches detections against all boxes of face_bbx_list and counts only those in the
difficulty's keep list (1-based gt_list); the others, including every invalid and
zero-size face, are ignore regions (a detection on them is neither TP nor FP).
'faces/valid' = not invalid and w > 0 and h > 0: the faces a detector should train on;
the others are best treated as ignore regions in training too. An image with no face has a
count of 0 and one line of zeros, which is skipped.
"""
from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from askd_jax.data import prepared
from askd_jax.evaluate.widerface import DIFFICULTIES, ImageGT, image_key

ATTRIBUTES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
_SPLIT_DIRS = {"train": "WIDER_train", "validation": "WIDER_val"}
_GT_TXT = "wider_face_split/wider_face_{}_bbx_gt.txt"
_MAT_DIRS = ("eval_tools/ground_truth", "ground_truth")


class ManualFiles:
  """Reads released files from a folder tree or from the released zips."""

  def __init__(self, root: Any):
    self.root = os.fspath(root)
    self._zips: dict[str, Optional[zipfile.ZipFile]] = {}

  def _zip(self, top: str) -> Optional[zipfile.ZipFile]:
    if top not in self._zips:
      path = os.path.join(self.root, top + ".zip")
      self._zips[top] = zipfile.ZipFile(path) if os.path.isfile(path) else None
    return self._zips[top]

  def where(self, rel: str) -> Optional[str]:
    """A printable location of rel, or None if it is absent."""
    path = os.path.join(self.root, rel)
    if os.path.isfile(path):
      return path
    z = self._zip(rel.split("/", 1)[0])
    if z is not None and rel in z.NameToInfo:
      return f"{z.filename}:{rel}"
    return None

  def has_tree(self, top: str) -> bool:
    return os.path.isdir(os.path.join(self.root, top)) or self._zip(top) is not None

  def read(self, rel: str) -> bytes:
    path = os.path.join(self.root, rel)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        return f.read()
    z = self._zip(rel.split("/", 1)[0])
    if z is not None and rel in z.NameToInfo:
      return z.read(rel)
    raise FileNotFoundError(f"{rel} not found in {self.root} (neither the file nor a member of "
                            f"{rel.split('/', 1)[0]}.zip); put the released WIDER FACE files there")

  def close(self):
    for z in self._zips.values():
      if z is not None:
        z.close()
    self._zips.clear()


@dataclasses.dataclass
class GtRecord:
  path: str          # '<event>/<name>.jpg' as in the txt
  lineno: int        # 1-based line of the path in the txt
  boxes: np.ndarray  # (G, 4) float32 x, y, w, h
  attributes: np.ndarray  # (G, 6) int32, ATTRIBUTES order


def parse_bbx_gt(text: str, source: str) -> list[GtRecord]:
  """Parses wider_face_{split}_bbx_gt.txt. Errors name source:line."""
  lines = text.splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  records, i = [], 0
  while i < len(lines):
    path = lines[i].strip()
    if not path.lower().endswith((".jpg", ".jpeg", ".png")):
      raise ValueError(f"{source}:{i + 1}: expected an image path ('<event>/<name>.jpg'), "
                       f"got {lines[i]!r}")
    if i + 1 >= len(lines):
      raise ValueError(f"{source}:{i + 2}: missing the face count after {path!r}")
    try:
      count = int(lines[i + 1].strip())
    except ValueError:
      raise ValueError(f"{source}:{i + 2}: expected the face count of {path!r}, got "
                       f"{lines[i + 1]!r}") from None
    if count < 0:
      raise ValueError(f"{source}:{i + 2}: negative face count {count} for {path!r}")
    rows = []
    j = i + 2
    for k in range(count):
      if j + k >= len(lines):
        raise ValueError(f"{source}:{j + k + 1}: file ends after {k} of {count} faces of {path!r}")
      fields = lines[j + k].split()
      try:
        values = [int(float(v)) for v in fields]
      except ValueError:
        values = []
      if len(values) != 10:
        raise ValueError(f"{source}:{j + k + 1}: expected 10 numbers 'x y w h blur expression "
                         f"illumination invalid occlusion pose', got {lines[j + k]!r}")
      rows.append(values)
    j += count
    # A 0-face image has one placeholder line of zeros.
    if count == 0 and j < len(lines) and len(lines[j].split()) == 10:
      j += 1
    arr = np.array(rows, np.int64).reshape(-1, 10)
    records.append(GtRecord(path, i + 1, arr[:, :4].astype(np.float32),
                            arr[:, 4:].astype(np.int32)))
    i = j
  return records


def _mat_str(x: Any) -> str:
  while isinstance(x, np.ndarray):
    if x.size != 1:
      raise ValueError(f"expected a single string in the .mat cell, got an array of shape {x.shape}")
    x = x.reshape(-1)[0]
  return str(x)


def _cells(x: Any) -> list[Any]:
  return list(np.asarray(x, dtype=object).reshape(-1))


def _read_mat(files: ManualFiles, name: str) -> tuple[dict[str, Any], str]:
  import scipy.io
  for d in _MAT_DIRS:
    rel = f"{d}/{name}"
    where = files.where(rel)
    if where is not None:
      return scipy.io.loadmat(io.BytesIO(files.read(rel))), where
  raise FileNotFoundError(f"{name} not found under {files.root}/eval_tools/ground_truth (or in "
                          "eval_tools.zip): it comes with the official WIDER FACE eval_tools")


def _load_val_mats(files: ManualFiles) -> list[ImageGT]:
  keep: dict[str, list[list[np.ndarray]]] = {}
  names: Optional[list[str]] = None
  boxes: Optional[list[np.ndarray]] = None
  box_src = None
  for d in DIFFICULTIES:
    mat, where = _read_mat(files, f"wider_{d}_val.mat")
    for field in ("event_list", "file_list", "gt_list"):
      if field not in mat:
        raise ValueError(f"{where}: missing the field {field!r} of the official ground truth")
    events = [_mat_str(e) for e in _cells(mat["event_list"])]
    these, keeps = [], []
    for ev, flist, glist in zip(events, _cells(mat["file_list"]), _cells(mat["gt_list"])):
      for f, g in zip(_cells(flist), _cells(glist)):
        these.append(f"{ev}/{_mat_str(f)}")
        keeps.append(np.asarray(g, np.float64).reshape(-1).astype(np.int64) - 1)
    if names is None:
      names = these
    elif these != names:
      raise ValueError(f"{where}: event_list/file_list differ from wider_easy_val.mat")
    keep[d] = keeps
    if boxes is None and "face_bbx_list" in mat:
      boxes, box_src = mat["face_bbx_list"], where
  try:
    full, where = _read_mat(files, "wider_face_val.mat")
    if "face_bbx_list" in full:
      boxes, box_src = full["face_bbx_list"], where
  except FileNotFoundError:
    pass
  if boxes is None:
    raise ValueError("no face_bbx_list in wider_face_val.mat or wider_{easy,medium,hard}_val.mat")
  flat = [np.asarray(b, np.float64).reshape(-1, 4) for ev in _cells(boxes) for b in _cells(ev)]
  if len(flat) != len(names):
    raise ValueError(f"{box_src}: face_bbx_list has {len(flat)} images, the keep lists {len(names)}")
  out = []
  for i, (name, b) in enumerate(zip(names, flat)):
    kp = {d: keep[d][i] for d in DIFFICULTIES}
    for d, k in kp.items():
      if k.size and (k.min() < 0 or k.max() >= len(b)):
        raise ValueError(f"wider_{d}_val.mat: keep index out of range for {name} ({len(b)} boxes)")
    out.append(ImageGT(name, b, kp))
  return out


def load_widerface_gt(manual_dir: Any, split: str = "val") -> list[ImageGT]:
  """Per-image ground truth + keep lists of the official .mat files, in their order."""
  if split not in ("val", "validation"):
    raise ValueError(f"difficulty keep lists exist only for the val split, got split={split!r}")
  files = ManualFiles(manual_dir)
  try:
    return _load_val_mats(files)
  finally:
    files.close()


def gt_from_example(example: dict[str, Any]) -> ImageGT:
  """ImageGT from a record of the 'validation' split (as_data_source)."""
  name = example["image/filename"]
  name = name.decode() if isinstance(name, bytes) else str(name)
  return ImageGT(image_key(name), np.asarray(example["faces/bbox"], np.float64).reshape(-1, 4),
                 {d: np.nonzero(example[f"faces/keep_{d}"])[0] for d in DIFFICULTIES})


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes -> (H, W, 3) uint8 RGB."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


class WiderFace(tfds.core.GeneratorBasedBuilder):
  """WIDER FACE train / validation with difficulty keep masks for validation."""

  name = "askd_wider_face"  # tfds ships a TF-based 'wider_face'; keep the registry apart
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as encoded bytes, boxes x,y,w,h, attributes, keep masks."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    feats = {
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded JPEG bytes
        "image/filename": tfds.features.Text(),  # '<event>/<name>.jpg'
        "image/id": tfds.features.Tensor(shape=(), dtype=np.int32),  # order in the txt
        "image/height": tfds.features.Tensor(shape=(), dtype=np.int32),
        "image/width": tfds.features.Tensor(shape=(), dtype=np.int32),
        "faces/bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),  # x, y, w, h
        "faces/attributes": tfds.features.Tensor(shape=(None, 6), dtype=np.int32),
        "faces/invalid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "faces/valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
    }
    for d in DIFFICULTIES:  # all False in train (no difficulty labels there)
      feats[f"faces/keep_{d}"] = tfds.features.Tensor(shape=(None,), dtype=np.bool_)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                 homepage="http://shuoyang1213.me/WIDERFACE/")

  def _split_generators(self, dl_manager):
    files = ManualFiles(dl_manager.manual_dir)
    splits = {s: self._generate_examples(os.fspath(dl_manager.manual_dir), s)
              for s, top in _SPLIT_DIRS.items() if files.has_tree(top)}
    files.close()
    if not splits:
      raise FileNotFoundError(f"neither WIDER_train nor WIDER_val (folder or zip) in "
                              f"{dl_manager.manual_dir}; see the builder's manual instructions")
    return splits

  def _generate_examples(self, manual_dir: str, split: str) -> Iterator[tuple[str, dict]]:
    files = ManualFiles(manual_dir)
    try:
      txt = _GT_TXT.format("train" if split == "train" else "val")
      source = files.where(txt) or os.path.join(manual_dir, txt)
      records = parse_bbx_gt(files.read(txt).decode("utf-8"), source)
      gt = {}
      if split == "validation":
        gt = {g.name: g for g in _load_val_mats(files)}
      for idx, rec in enumerate(records):
        rel = f"{_SPLIT_DIRS[split]}/images/{rec.path}"
        if files.where(rel) is None:
          raise FileNotFoundError(f"{source}:{rec.lineno}: image {rec.path!r} not found as "
                                  f"{os.path.join(manual_dir, rel)} nor in {_SPLIT_DIRS[split]}.zip")
        data = files.read(rel)
        with Image.open(io.BytesIO(data)) as im:
          width, height = im.size
        n = len(rec.boxes)
        keep = {d: np.zeros(n, bool) for d in DIFFICULTIES}
        if split == "validation":
          g = gt.get(image_key(rec.path))
          if g is None:
            raise ValueError(f"{source}:{rec.lineno}: {rec.path!r} is not in the eval_tools "
                             "ground truth (.mat); use the matching WIDER FACE release")
          if len(g.boxes) != n:
            raise ValueError(f"{source}:{rec.lineno}: {rec.path!r} has {n} faces in the txt but "
                             f"{len(g.boxes)} in face_bbx_list")
          for d in DIFFICULTIES:
            keep[d][g.keep[d]] = True
        invalid = rec.attributes[:, 3] != 0
        valid = ~invalid & (rec.boxes[:, 2] > 0) & (rec.boxes[:, 3] > 0)
        example = {
            "image": data, "image/filename": rec.path, "image/id": idx,
            "image/height": height, "image/width": width,
            "faces/bbox": rec.boxes, "faces/attributes": rec.attributes,
            "faces/invalid": invalid, "faces/valid": valid,
        }
        example.update({f"faces/keep_{d}": keep[d] for d in DIFFICULTIES})
        yield rec.path, example
    finally:
      files.close()


def prepare(manual_dir: Any, data_dir: Any) -> WiderFace:
  """Builds the array_record files (once) and returns the builder; read with
  builder.as_data_source('train' | 'validation')."""
  builder = WiderFace(data_dir=os.fspath(data_dir))
  prepared.write_array_record(builder, manual_dir)
  return builder
