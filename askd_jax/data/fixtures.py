"""Small data sets written in the formats the real ones are distributed in.

Used by the tests and by `python -m askd_jax.tools.rehearse`, which prepares them with the
same builders a user's files go through: an insightface train.rec/.idx (see recordio.py),
verification .bin files, a TinyFace folder, an IJB-B/IJB-C release as insightface
distributes it (loose_crop/ photos, meta/ lists), the ImageNet manual-dir tars and a WIDER
FACE release (images, bbx_gt txt files, eval_tools .mat ground truth).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(
      buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def random_pixels(n: int, seed: int, size: int = 112) -> List[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def gradient_pixels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A smooth image with some noise (JPEG-friendly, every crop differs)."""
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1), (yy + xx) % 256], -1)
  return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def identity_pixels(label: int, seed: int, size: int = 112) -> np.ndarray:
  """An image whose mean colour depends on `label` (so identities are learnable), plus noise."""
  rng = np.random.default_rng(seed)
  base = np.full((size, size, 3), (40 * label) % 216, np.uint8)
  return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- faces

def write_verification_bin(path: str, pixels: Sequence[np.ndarray], issame: Sequence[bool],
                           fmt: str = "PNG") -> None:
  """An insightface verification .bin: pickle of ([2n encoded images], [n is_same])."""
  with open(path, "wb") as f:
    pickle.dump(([encode_image(p, fmt) for p in pixels], list(issame)), f,
                protocol=pickle.HIGHEST_PROTOCOL)


TINYFACE_LAYOUT = {"Probe": ["1_0.png", "2_0.png", "10_0.png"],
                   "Gallery_Match": ["1_1.png", "2_1.png", "10_1.png", "10_2.png"],
                   "Gallery_Distractor": ["x_0.png", "sub/y.png"]}


def write_tinyface_tree(root: str, pixels: Sequence[np.ndarray],
                        layout: Mapping[str, Sequence[str]] = TINYFACE_LAYOUT
                        ) -> Dict[str, np.ndarray]:
  """TinyFace's aligned_pad_0.1_pad_high/{Probe,Gallery_Match,Gallery_Distractor} folders
  (file names '<identity>_<n>.png'); returns {relative path: pixels}."""
  it = iter(pixels)
  files = {}
  for d, names in layout.items():
    for n in names:
      rel = f"aligned_pad_0.1_pad_high/{d}/{n}"
      path = os.path.join(root, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      img = next(it)
      with open(path, "wb") as f:
        f.write(encode_image(img))
      files[rel] = img
  return files


# -------------------------------------------------------------------------------- IJB

# (template, media, subject) of each image: templates 1-6, several media each, one media
# with several frames (a video), subjects 0-2 with two templates each.
IJB_LAYOUT = ((1, 10, 0), (1, 10, 0), (1, 11, 0), (2, 12, 0), (2, 13, 0), (2, 13, 0),
              (3, 20, 1), (3, 21, 1), (4, 22, 1), (4, 22, 1), (4, 22, 1), (4, 23, 1),
              (5, 30, 2), (5, 31, 2), (6, 32, 2), (6, 33, 2), (6, 33, 2), (3, 24, 1))


def write_ijb_release(root: str, name: str = "ijbc",
                      layout: Sequence[Tuple[int, int, int]] = IJB_LAYOUT, seed: int = 0
                      ) -> Dict[str, Any]:
  """insightface's IJB release under root/IJBC (or IJBB): loose_crop/<k>.jpg photos of a
  face placed by a random similarity transform, meta/<name>_face_tid_mid.txt
  (`name tid mid`), meta/<name>_name_5pts_score.txt (`name x1 y1 ... x5 y5 score`, the
  face's true landmarks) and meta/<name>_template_pair_label.txt (`t1 t2 label`, every pair
  of templates, 1 when they share a subject). Returns what was written: names, templates,
  medias, scores, landmarks (N, 5, 2), faces (the 112x112 face of each photo), pairs (P, 3).
  """
  from askd_jax.data import align  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  top = os.path.join(root, name.upper())
  os.makedirs(os.path.join(top, "loose_crop"), exist_ok=True)
  os.makedirs(os.path.join(top, "meta"), exist_ok=True)
  names, marks, faces, scores = [], [], [], []
  for k, (_, _, subject) in enumerate(layout, 1):
    face = _smooth_face(subject, rng)
    a, s = np.deg2rad(rng.uniform(-25, 25)), rng.uniform(0.8, 1.6)
    m = np.eye(3)
    m[:2, :2] = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m[:2, 2] = rng.uniform(10, 40, 2)
    photo = _place(face, m, (200, 190))
    pts = align.ARCFACE_TEMPLATE.astype(np.float64) @ m[:2, :2].T + m[:2, 2]
    names.append(f"{k}.jpg")
    marks.append(pts)
    faces.append(face)
    scores.append(round(float(rng.uniform(0.3, 1.0)), 6))
    with open(os.path.join(top, "loose_crop", names[-1]), "wb") as f:
      f.write(encode_image(photo, "JPEG"))
  templates = [t for t, _, _ in layout]
  subject_of = {t: subj for t, _, subj in layout}
  tids = sorted(subject_of)
  pairs = [(a, b, int(subject_of[a] == subject_of[b])) for i, a in enumerate(tids)
           for b in tids[i + 1:]]
  meta = os.path.join(top, "meta")
  with open(os.path.join(meta, f"{name}_face_tid_mid.txt"), "w") as f:
    f.writelines(f"{n} {t} {m}\n" for n, (t, m, _) in zip(names, layout))
  with open(os.path.join(meta, f"{name}_name_5pts_score.txt"), "w") as f:
    f.writelines(n + " " + " ".join(f"{v:.4f}" for v in p.reshape(-1)) + f" {sc}\n"
                 for n, p, sc in zip(names, marks, scores))
  with open(os.path.join(meta, f"{name}_template_pair_label.txt"), "w") as f:
    f.writelines(f"{a} {b} {lab}\n" for a, b, lab in pairs)
  return {"root": top, "names": names, "templates": np.array(templates),
          "medias": np.array([m for _, m, _ in layout]), "scores": np.array(scores),
          "landmarks": np.array(marks, np.float32), "faces": faces,
          "pairs": np.array(pairs, np.int64)}


def _smooth_face(subject: int, rng: np.random.Generator) -> np.ndarray:
  """A 112x112 image that survives resampling: a colour and stripes per subject, and noise."""
  yy, xx = np.mgrid[0:112, 0:112]
  stripes = 40 * np.sin(xx / (6.0 + subject) + yy / 11.0)
  base = (50 + 60 * subject) % 200 + 30
  img = np.stack([base + stripes, base - stripes, np.full(xx.shape, 120.0)], -1)
  return np.clip(img + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)


def _place(face: np.ndarray, matrix: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  """The face (112x112, template placement) mapped into a photo of hw by `matrix`."""
  from skimage.transform import warp  # pylint: disable=g-import-not-at-top
  inv = np.linalg.inv(matrix)  # photo pixel -> face pixel
  photo = warp(face, inv, output_shape=hw, order=1, mode="constant", cval=0.0,
               preserve_range=True)
  return np.clip(np.rint(photo), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- ImageNet

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(root: str, train_classes: Sequence[int] = (0, 7, 999),
                        per_class: int = 3, val_numbers: Sequence[int] = (3, 1, 4, 2),
                        train_hw: Tuple[int, int] = (40, 56), val_hw: Tuple[int, int] = (48, 36),
                        seed: int = 0) -> Dict[str, Dict[str, Tuple[bytes, int]]]:
  """ILSVRC2012_img_train.tar (a tar of per-class tars nXXXXXXXX.tar) and
  ILSVRC2012_img_val.tar (ILSVRC2012_val_<n>.JPEG, labelled by tfds's validation_labels.txt),
  with tfds's oddities: a CMYK JPEG and a PNG named .JPEG in each class.
  Returns {'train'|'val': {file name: (bytes, class index)}}."""
  from askd_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  syn = imagenet.synsets()
  files: Dict[str, Dict[str, Tuple[bytes, int]]] = {"train": {}, "val": {}}
  with tarfile.open(os.path.join(root, imagenet.TRAIN_TAR), "w") as outer:
    for k, idx in enumerate(train_classes):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for j in range(per_class):
          name = f"{syn[idx]}_{j}.JPEG"
          h, w = (train_hw[0] + 8 * (j % 3), train_hw[1] - 4 * (k % 3))
          mode, fmt = (("CMYK", "JPEG") if j % 3 == 1 else ("RGB", "PNG") if j % 3 == 2 else
                       ("RGB", "JPEG"))
          data = encode_image(gradient_pixels(rng, h, w), fmt, mode)
          _add(inner, name, data)
          files["train"][name] = (data, idx)
      _add(outer, f"{syn[idx]}.tar", inner_buf.getvalue())
  with open(imagenet.validation_labels_file()) as f:
    val_syn = f.read().split()
  with tarfile.open(os.path.join(root, imagenet.VAL_TAR), "w") as tar:
    for n in val_numbers:
      name = f"ILSVRC2012_val_{n:08d}.JPEG"
      data = encode_image(gradient_pixels(rng, *val_hw), "JPEG")
      _add(tar, name, data)
      files["val"][name] = (data, syn.index(val_syn[n - 1]))  # line n labels file n
  return files


# -------------------------------------------------------------------------- WIDER FACE
# A split: {event: {image name: [[x, y, w, h, blur, expression, illumination, invalid,
# occlusion, pose], ...]}}; keep: {difficulty: {image name: 1-based face indices}}.

def widerface_txt(split: Mapping[str, Mapping[str, Sequence[Sequence[int]]]]) -> str:
  """wider_face_{train,val}_bbx_gt.txt (0 faces: a count of 0 and one line of zeros)."""
  out = []
  for ev, imgs in split.items():
    for name, faces in imgs.items():
      out.append(f"{ev}/{name}.jpg")
      out.append(str(len(faces)))
      for f in faces or [[0] * 10]:
        out.append(" ".join(str(v) for v in f) + " ")  # the release has a trailing space
  return "\n".join(out) + "\n"


def _cell(items: Sequence[Any]) -> np.ndarray:
  a = np.empty((len(items), 1), dtype=object)
  for i, x in enumerate(items):
    a[i, 0] = x
  return a


def widerface_mat(val, keep_lists) -> Dict[str, np.ndarray]:
  """eval_tools/ground_truth/wider_<difficulty>_val.mat's variables for one difficulty."""
  events = list(val)
  return {
      "event_list": _cell(events),
      "file_list": _cell([_cell(list(val[e])) for e in events]),
      "face_bbx_list": _cell([_cell([np.array(f, float).reshape(-1, 10)[:, :4]
                                     for f in val[e].values()]) for e in events]),
      "gt_list": _cell([_cell([np.array(keep_lists[n], float).reshape(-1, 1)
                               for n in val[e]]) for e in events]),
  }


def widerface_release_files(train, val, keep, sizes: Mapping[str, Tuple[int, int]]
                            ) -> Dict[str, bytes]:
  """{relative path: bytes} of WIDER_train, WIDER_val, wider_face_split and eval_tools;
  sizes: {image name: (width, height)}."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  from askd_jax.evaluate.widerface import DIFFICULTIES  # pylint: disable=g-import-not-at-top
  files = {"wider_face_split/wider_face_train_bbx_gt.txt": widerface_txt(train).encode(),
           "wider_face_split/wider_face_val_bbx_gt.txt": widerface_txt(val).encode()}
  for top, split in (("WIDER_train", train), ("WIDER_val", val)):
    for ev, imgs in split.items():
      for name in imgs:
        w, h = sizes[name]
        rng = np.random.default_rng(len(name))
        files[f"{top}/images/{ev}/{name}.jpg"] = encode_image(
            rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "JPEG")
  for d in DIFFICULTIES:
    buf = io.BytesIO()
    scipy.io.savemat(buf, widerface_mat(val, keep[d]))
    files[f"eval_tools/ground_truth/wider_{d}_val.mat"] = buf.getvalue()
  return files


def write_tree(root: str, files: Mapping[str, bytes]) -> None:
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)


def write_zips(root: str, files: Mapping[str, bytes]) -> None:
  """One <top folder>.zip per top-level folder, as the release's WIDER_train.zip..."""
  os.makedirs(root, exist_ok=True)
  by_top: Dict[str, Dict[str, bytes]] = {}
  for rel, data in files.items():
    by_top.setdefault(rel.split("/", 1)[0], {})[rel] = data
  for top, members in by_top.items():
    with zipfile.ZipFile(os.path.join(root, top + ".zip"), "w") as z:
      for rel, data in members.items():
        z.writestr(rel, data)
