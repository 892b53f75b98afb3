"""Small data sets written in the formats the real ones are distributed in.

Used by the tests and by `python -m askd_jax.tools.rehearse`, which prepares them with the
same builders a user's files go through: an insightface train.rec/.idx (see recordio.py),
verification .bin files, a TinyFace folder, the ImageNet manual-dir tars and a WIDER FACE
release (images, bbx_gt txt files, eval_tools .mat ground truth).
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
