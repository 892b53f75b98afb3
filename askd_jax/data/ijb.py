"""IJB-B / IJB-C 1:1 verification sets as insightface distributes them, as a tfds builder.

    python -m askd_jax.data.prepare --dataset=ijbc --manual_dir=DIR --data_dir=DATA_DIR
    python -m askd_jax.data.prepare --dataset=ijbb --manual_dir=DIR --data_dir=DATA_DIR

manual_dir: insightface's IJB release folder (the one holding IJBC/ or IJBB/, or that folder
itself) with

    loose_crop/<name>.jpg                  the photos (loosely cropped faces)
    meta/ijbc_face_tid_mid.txt             `name template_id media_id` per image
    meta/ijbc_name_5pts_score.txt          `name x1 y1 ... x5 y5 detector_score` per image
    meta/ijbc_template_pair_label.txt      `template_id template_id label` per pair (1: same)

(`ijbb_...` for IJB-B). Every image is aligned at prepare time to the 112x112 ArcFace crop
with its five points (askd_jax.data.align, insightface's alignment) and stored losslessly
(PNG), so evaluation reads crops like every other face set.

Builder `ijb/ijbc` (`ijb/ijbb`), split `images`, in the order of ijbc_face_tid_mid.txt:
  image (encoded PNG, 112x112 RGB), template (int32), media (int32), score (float32, the
  detector score), landmarks ((5, 2) float32, in the loose crop), index (int32, row in
  face_tid_mid.txt), source (str, the file name under loose_crop/).
The template pairs are not a split (tfds gives every split the same features): they are
`template_pairs.npy` ((P, 3) int32: template 1, template 2, label) in the prepared folder,
read with `template_pairs(name, data_dir)`; the images' template, media and score are
also in `image_meta.npz` (`image_meta(name, data_dir)`, without reading the images). metadata: num_images, num_templates, num_media,
num_pairs, num_genuine.

Everything is checked before anything is written: a missing meta file or image, a line with
the wrong number of values, an image without landmarks, a pair naming a template without
images stop with one line naming the file and line; tfds writes into a temporary folder
renamed only when the set is complete, so a failed run leaves nothing a re-run would trust.
A photo that does not decode stops the run too (with on_corrupt='skip' as well): leaving an
image out would change its template and so the protocol.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from askd_jax.data import align, faces, prepared

NAMES = ("ijbb", "ijbc")
PAIRS_FILE = "template_pairs.npy"
META_FILE = "image_meta.npz"


@dataclasses.dataclass
class Release:
  """The checked meta data of one release (rows in face_tid_mid.txt order)."""
  root: str
  names: List[str]
  templates: np.ndarray   # (N,) int64
  medias: np.ndarray      # (N,) int64
  scores: np.ndarray      # (N,) float32
  landmarks: np.ndarray   # (N, 5, 2) float32
  pairs: np.ndarray       # (P, 3) int64: t1, t2, label


def release_root(manual_dir: str, name: str) -> str:
  """manual_dir/IJBC if it exists, else manual_dir (which must hold loose_crop/, meta/)."""
  sub = os.path.join(manual_dir, name.upper())
  return sub if os.path.isdir(sub) else manual_dir


def meta_file(root: str, name: str, what: str) -> str:
  path = os.path.join(root, "meta", f"{name}_{what}.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; insightface's {name.upper()} release has "
                            f"{name.upper()}/meta/{name}_{what}.txt (manual_dir is the folder "
                            f"holding {name.upper()}/ or {name.upper()}/ itself)")
  return path


def _int_rows(path: str, fields: str) -> List[Tuple[int, List[str]]]:
  """(line number, values) of the non-blank lines, each with len(fields.split()) values."""
  want = len(fields.split())
  out = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != want:
        raise ValueError(f"{path} line {n}: {len(parts)} values; expected {want} "
                         f"('{fields}')")
      out.append((n, parts))
  if not out:
    raise ValueError(f"{path}: empty (lines of '{fields}')")
  return out


def _int(path: str, n: int, value: str, what: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{path} line {n}: {what} {value!r} is not an integer") from None


def read_release(manual_dir: str, name: str) -> Release:
  """Reads and cross-checks the meta files and that every image exists (writes nothing)."""
  if name not in NAMES:
    raise ValueError(f"name={name!r}: use one of {NAMES}")
  root = release_root(manual_dir, name)
  tid_mid = meta_file(root, name, "face_tid_mid")
  pts_file = meta_file(root, name, "name_5pts_score")
  pair_file = meta_file(root, name, "template_pair_label")
  crops = os.path.join(root, "loose_crop")
  if not os.path.isdir(crops):
    raise FileNotFoundError(f"{crops}: missing; insightface's {name.upper()} release keeps its "
                            "photos in loose_crop/")
  names, templates, medias, line_of = [], [], [], {}
  for n, (img, t, m) in _int_rows(tid_mid, "name template_id media_id"):
    if img in line_of:
      raise ValueError(f"{tid_mid} line {n}: {img} is already listed on line {line_of[img]}")
    line_of[img] = n
    names.append(img)
    templates.append(_int(tid_mid, n, t, "template id"))
    medias.append(_int(tid_mid, n, m, "media id"))
  marks: Dict[str, align.Landmarks] = {}
  with open(pts_file, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      e = align.parse_landmark_line(line, pts_file, n, require_score=True)
      if e is None:
        continue
      if e.name not in line_of:
        raise ValueError(f"{pts_file} line {n}: {e.name} is not in {tid_mid}")
      marks[e.name] = e
  for img in names:
    if img not in marks:
      raise ValueError(f"{tid_mid} line {line_of[img]}: {img} has no line in {pts_file}")
    if not os.path.isfile(os.path.join(crops, img)):
      raise FileNotFoundError(f"{tid_mid} line {line_of[img]}: image "
                              f"{os.path.join(crops, img)} not found")
  known = set(templates)
  pairs = []
  for n, (a, b, lab) in _int_rows(pair_file, "template_id template_id label"):
    row = [_int(pair_file, n, a, "template id"), _int(pair_file, n, b, "template id"),
           _int(pair_file, n, lab, "label")]
    if row[2] not in (0, 1):
      raise ValueError(f"{pair_file} line {n}: label {row[2]}; expected 1 (same subject) or 0")
    for t in row[:2]:
      if t not in known:
        raise ValueError(f"{pair_file} line {n}: template {t} has no image in {tid_mid}")
    pairs.append(row)
  return Release(root=root, names=names, templates=np.array(templates, np.int64),
                 medias=np.array(medias, np.int64),
                 scores=np.array([marks[i].score for i in names], np.float32),
                 landmarks=np.stack([marks[i].points for i in names]),
                 pairs=np.array(pairs, np.int64).reshape(-1, 3))


def aligned_png(path: str, landmarks: np.ndarray) -> bytes:
  """The photo at `path` aligned with its 5 points, as PNG bytes (112x112 RGB)."""
  crop = align.align_face(align.read_photo(path), landmarks)
  buf = io.BytesIO()
  Image.fromarray(crop).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class IJB(faces._FaceBuilder):  # pylint: disable=protected-access
  """IJB-B / IJB-C (insightface's release): aligned crops + template/media/score; pairs in
  template_pairs.npy."""

  name = "ijb"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n.upper()} (insightface)")
                     for n in NAMES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put insightface's IJB release (IJBC/ or IJBB/ with "
                                  "loose_crop/ and meta/) in manual_dir.")

  def _info(self):
    i32 = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)  # noqa: E731
    return self._info_from({
        "image": faces._image_feature(),  # pylint: disable=protected-access
        "template": i32(), "media": i32(), "index": i32(),
        "score": tfds.features.Tensor(shape=(), dtype=np.float32),
        "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
        "source": faces._str_feature()})  # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    rel = read_release(str(dl_manager.manual_dir), self.builder_config.name)
    os.makedirs(self.data_dir, exist_ok=True)  # the temporary folder tfds renames when done
    np.save(os.path.join(self.data_dir, PAIRS_FILE), rel.pairs.astype(np.int32))
    np.savez(os.path.join(self.data_dir, META_FILE), template=rel.templates, media=rel.medias,
             score=rel.scores)
    md = self.info.metadata
    md["num_images"] = len(rel.names)
    md["num_templates"] = int(np.unique(rel.templates).size)
    md["num_media"] = int(np.unique(np.stack([rel.templates, rel.medias], 1), axis=0).shape[0])
    md["num_pairs"] = int(rel.pairs.shape[0])
    md["num_genuine"] = int(rel.pairs[:, 2].sum())
    return {"images": self._generate_examples(rel)}

  def _generate_examples(self, rel: Release):
    from askd_jax import stop  # pylint: disable=g-import-not-at-top
    crops = os.path.join(rel.root, "loose_crop")
    for i, img in enumerate(rel.names):
      if i % 256 == 0:
        stop.check(f"data preparation ({crops}/{img})")
      try:
        png = aligned_png(os.path.join(crops, img), rel.landmarks[i])
      except ValueError as e:
        raise faces.CorruptImageError(f"{e}; an IJB image cannot be skipped (its template "
                                      "would change): replace the file") from None
      yield i, {"image": png, "template": int(rel.templates[i]), "media": int(rel.medias[i]),
                "index": i, "score": float(rel.scores[i]), "landmarks": rel.landmarks[i],
                "source": img}


def builder(name: str, data_dir: str, **kwargs) -> IJB:
  """The builder of 'ijbb' or 'ijbc' (prepare-time kwargs: on_corrupt)."""
  if name not in NAMES:
    raise ValueError(f"name={name!r}: use one of {NAMES}")
  return IJB(config=name, data_dir=data_dir, **kwargs)


def prepare(name: str, manual_dir: str, data_dir: str, **kwargs) -> IJB:
  """Reads insightface's release in manual_dir, writes array_record under data_dir."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir={manual_dir}: no such folder")
  b = builder(name, data_dir, **kwargs)
  prepared.write_array_record(b, manual_dir)
  return b


def _prepared(name: str, data_dir: str) -> IJB:
  b = builder(name, data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(
        f"{b.data_dir}: {name} is not prepared; run python -m askd_jax.data.prepare "
        f"--dataset={name} --manual_dir=<insightface's IJB release> --data_dir={data_dir}")
  return b


def data_source(name: str, data_dir: str):
  """The prepared `images` split as a random-access grain source (records above)."""
  return _prepared(name, data_dir).as_data_source("images")


def template_pairs(name: str, data_dir: str, mmap: bool = True
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(template 1, template 2, label) of every pair (P,) each, in the meta file's order."""
  p = np.load(os.path.join(_prepared(name, data_dir).data_dir, PAIRS_FILE),
              mmap_mode="r" if mmap else None)
  return p[:, 0], p[:, 1], p[:, 2]


def image_meta(name: str, data_dir: str) -> Dict[str, np.ndarray]:
  """{'template', 'media' (int64), 'score' (float32)}: (N,) each, in the split's order."""
  with np.load(os.path.join(_prepared(name, data_dir).data_dir, META_FILE)) as z:
    return {k: z[k] for k in ("template", "media", "score")}


__all__ = ["NAMES", "PAIRS_FILE", "META_FILE", "Release", "read_release", "aligned_png", "IJB", "builder",
           "prepare", "data_source", "template_pairs", "image_meta"]
