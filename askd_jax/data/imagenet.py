"""ImageNet-1k (ILSVRC 2012) as a tfds builder without TensorFlow, and its image transforms.

    python -m askd_jax.data.imagenet --manual_dir=DIR --data_dir=DATA_DIR

tfds's own `imagenet2012` builder needs TensorFlow for its `Image` feature; this one
(`askd_imagenet2012`) reads the SAME files from manual_dir, as distributed by image-net.org:

    ILSVRC2012_img_train.tar   a tar of 1000 per-class tars nXXXXXXXX.tar of JPEGs
    ILSVRC2012_img_val.tar     50,000 JPEGs ILSVRC2012_val_XXXXXXXX.JPEG

and the label files tfds ships in its package: `labels.txt` (the 1000 synsets; the class
index is the line number) and `validation_labels.txt` (the synset of every validation
image, in the sorted order of the validation file names). Each example stores the encoded
image bytes (an object-dtype Tensor), the label and the file name, written as array_record
and read with `as_data_source` + grain. Images are decoded in the loader (`train_transforms`,
`eval_transforms`), where PIL also converts the CMYK / PNG / grayscale files to RGB.

Transforms (numpy + Pillow, per record, in grain's worker processes):
  train: Inception crop (random area in [0.08, 1] of the image, aspect ratio in [3/4, 4/3]
         log-uniform, 10 tries then a centre crop; torchvision's RandomResizedCrop) resized
         bilinearly to 224, then a random horizontal flip.
  eval:  shorter side resized to 256 (bilinear), centre crop 224.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import tarfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from askd_jax.data import augment
from askd_jax.data.prepared import prepare_once, resolve_data_dir

Record = Dict[str, Any]
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# Where tfds keeps its label files (4.9.x; older releases used image_classification/).
_LABEL_FILES = ("datasets/imagenet2012/labels.txt", "image_classification/imagenet2012_labels.txt")
_VAL_LABEL_FILES = ("datasets/imagenet2012/validation_labels.txt",
                    "image_classification/imagenet2012_validation_labels.txt")


def _tfds_file(candidates: Sequence[str]) -> str:
  for rel in candidates:
    path = os.fspath(tfds.core.tfds_path(rel))
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"tensorflow_datasets has none of {list(candidates)}; reinstall "
                          "tensorflow-datasets (pip install tensorflow-datasets==4.9.10)")


def _read_lines(path: str) -> List[str]:
  with open(path) as f:
    return f.read().strip().splitlines()  # splitlines also drops Windows '\r'


def synsets() -> List[str]:
  """The 1000 ImageNet synsets (n01440764, ...); class index = position."""
  return _read_lines(_tfds_file(_LABEL_FILES))


def validation_labels_file() -> str:
  return _tfds_file(_VAL_LABEL_FILES)


# ----------------------------------------------------------------------------- builder

class AskdImagenet2012(tfds.core.GeneratorBasedBuilder):
  """ILSVRC 2012 train / validation from the image-net.org tars; no TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded images + label + file name, read from the tfds manual_dir "
                            "files of imagenet2012."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"manual_dir must hold {TRAIN_TAR} and {VAL_TAR} as "
                                  "downloaded from https://image-net.org/download-images "
                                  "(the files tfds's imagenet2012 expects).")

  def __init__(self, *, validation_labels: Optional[str] = None, **kwargs):
    # The default is tfds's own list; another file (same format) is for tests and subsets.
    self._val_labels = validation_labels
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "file_name": tfds.features.Tensor(shape=(), dtype=np.str_),
        }),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/",
        disable_shuffling=True,  # grain shuffles globally; writing in order is cheaper
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    train, val = os.path.join(manual, TRAIN_TAR), os.path.join(manual, VAL_TAR)
    splits = {}
    if os.path.isfile(train):
      splits["train"] = self._generate_examples(train, "train")
    if os.path.isfile(val):
      splits["validation"] = self._generate_examples(val, "validation")
    if not splits:
      raise FileNotFoundError(f"manual_dir={manual} holds neither {TRAIN_TAR} nor {VAL_TAR}; "
                              "put the ILSVRC 2012 tars there (see docs/imagenet.md)")
    return splits

  def _generate_examples(self, path: str, split: str) -> Iterator[Tuple[str, Record]]:
    if split == "train":
      return self._generate_train(path)
    return self._generate_validation(path)

  def _generate_train(self, path: str) -> Iterator[Tuple[str, Record]]:
    index = {s: i for i, s in enumerate(synsets())}
    with tarfile.open(path, mode="r|") as outer:  # streamed: one pass over ~140 GB
      for member in outer:
        if not member.isfile():
          continue
        synset = os.path.basename(member.name)[:-len(".tar")]
        if not member.name.endswith(".tar") or synset not in index:
          raise ValueError(f"{path}: member {member.name!r} is not a per-class tar "
                           "nXXXXXXXX.tar of an ImageNet-1k synset; is this ILSVRC2012_img_train.tar?")
        inner_bytes = io.BytesIO(outer.extractfile(member).read())  # one class, ~150 MB
        with tarfile.open(fileobj=inner_bytes, mode="r:") as inner:
          for m in inner:
            if m.isfile():
              name = os.path.basename(m.name)
              yield name, {"image": inner.extractfile(m).read(), "label": index[synset],
                           "file_name": name}

  def _generate_validation(self, path: str) -> Iterator[Tuple[str, Record]]:
    index = {s: i for i, s in enumerate(synsets())}
    labels_path = self._val_labels or validation_labels_file()
    labels = _read_lines(labels_path)
    with tarfile.open(path, mode="r:") as tar:
      names = sorted(os.path.basename(m.name) for m in tar.getmembers() if m.isfile())
    if len(names) > len(labels):
      raise ValueError(f"{path} holds {len(names)} images but {labels_path} labels only "
                       f"{len(labels)}; is this ILSVRC2012_img_val.tar?")
    # Labels are listed in the sorted order of the file names, not the tar's order.
    by_name = dict(zip(names, labels))
    with tarfile.open(path, mode="r|") as tar:
      for m in tar:
        if m.isfile():
          name = os.path.basename(m.name)
          synset = by_name[name]
          if synset not in index:
            raise ValueError(f"{labels_path}: {synset!r} (for {name}) is not an ImageNet-1k synset")
          yield name, {"image": tar.extractfile(m).read(), "label": index[synset],
                       "file_name": name}


def prepare(manual_dir: Optional[str], data_dir: Optional[str] = None,
            validation_labels: Optional[str] = None) -> AskdImagenet2012:
  """The prepared builder; converts manual_dir's tars on first use (hours for the full set)."""
  data_dir = resolve_data_dir(data_dir)
  builder = AskdImagenet2012(data_dir=data_dir, validation_labels=validation_labels)
  if builder.is_prepared():
    return builder
  if not manual_dir or not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f"{builder.data_dir}: askd_imagenet2012 is not prepared and manual_dir={manual_dir!r} "
        f"is not a folder; set config.data.manual_dir to the folder holding {TRAIN_TAR} and "
        f"{VAL_TAR}, or run python -m askd_jax.data.imagenet --manual_dir=DIR --data_dir={data_dir}")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise FileNotFoundError(f"{builder.data_dir}: prepare askd_imagenet2012 once before a "
                            "multi-host run: python -m askd_jax.data.imagenet --manual_dir=DIR "
                            f"--data_dir={data_dir}")
  return prepare_once(
      lambda: AskdImagenet2012(data_dir=data_dir, validation_labels=validation_labels),
      data_dir, ".askd_imagenet2012.lock", manual_dir=manual_dir)


# -------------------------------------------------------------------------- transforms

def _open_rgb(data: Any, where: str = "image") -> Image.Image:
  """Encoded bytes (or an already decoded uint8 HWC array) -> a loaded RGB PIL image."""
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
    return Image.fromarray(data)
  if isinstance(data, np.ndarray):
    data = data.item()
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise ValueError(f"{where}: image does not decode ({type(e).__name__}: {e})") from None
  return im if im.mode == "RGB" else im.convert("RGB")  # CMYK, L, P, RGBA -> RGB


def _where(record: Record) -> str:
  name = record.get("file_name")
  if isinstance(name, bytes):
    name = name.decode("utf-8", "replace")
  return str(name) if name is not None else "image"


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) of an Inception crop (torchvision's sampling).

  Area ~ U(scale) x image area, aspect (w/h) log-uniform in `ratio`; up to 10 tries, then
  the largest centred crop whose aspect is clamped to `ratio`.
  """
  area = height * width
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_r))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop_box(height: int, width: int, resize: int,
                           size: int) -> Tuple[Tuple[int, int], Tuple[float, float, float, float]]:
  """(resized (w, h), crop box (l, t, r, b) in resized pixels): shorter side -> resize, centre size."""
  if height <= width:
    new_h, new_w = resize, int(resize * width / height)
  else:
    new_w, new_h = resize, int(resize * height / width)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return (new_w, new_h), (left, top, left + size, top + size)


@dataclasses.dataclass(frozen=True)
class DecodeRandomResizedCrop(grain.RandomMapTransform):
  """Decode, Inception-crop, resize to (size, size) bilinear (antialiased): uint8 HWC RGB."""
  size: int = 224
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    im = _open_rgb(record["image"], _where(record))
    top, left, h, w = random_resized_crop_box(im.height, im.width, rng, self.scale, self.ratio)
    out = im.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return {**record, "image": np.asarray(out, np.uint8)}


@dataclasses.dataclass(frozen=True)
class DecodeResizeCenterCrop(grain.MapTransform):
  """Decode, resize the shorter side to `resize` (bilinear), centre-crop (size, size)."""
  size: int = 224
  resize: int = 256

  def map(self, record: Record) -> Record:
    im = _open_rgb(record["image"], _where(record))
    if self.resize == self.size and im.width == im.height == self.size:
      return {**record, "image": np.asarray(im, np.uint8)}
    (nw, nh), box = resize_center_crop_box(im.height, im.width, self.resize, self.size)
    out = im.resize((nw, nh), Image.BILINEAR).crop(box)
    return {**record, "image": np.asarray(out, np.uint8)}


def train_transforms(size: int = 224, scale: Sequence[float] = (0.08, 1.0),
                     ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True) -> Tuple[Any, ...]:
  """Inception crop + flip (the standard ImageNet training augmentation)."""
  crop = DecodeRandomResizedCrop(int(size), tuple(map(float, scale)), tuple(map(float, ratio)))
  return (crop, augment.RandomFlip()) if flip else (crop,)


def eval_transforms(size: int = 224, resize: int = 256) -> Tuple[Any, ...]:
  """Resize-256 / centre-crop-224 (ratio 0.875) evaluation."""
  if resize < size:
    raise ValueError(f"eval resize={resize} must be >= the crop size {size}")
  return (DecodeResizeCenterCrop(int(size), int(resize)),)


# ----------------------------------------------------------------------------- CLI

def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  try:
    b = prepare(f.manual_dir, f.data_dir)
  except (OSError, ValueError) as e:
    raise SystemExit(f"prepare askd_imagenet2012: {e}") from None
  print(f"askd_imagenet2012: {b.data_dir} "
        f"{ {k: v.num_examples for k, v in b.info.splits.items()} }")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("manual_dir", None, f"folder holding {TRAIN_TAR} and {VAL_TAR}",
                      required=True)
  flags.DEFINE_string("data_dir", None, "where the array_record files go (default "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
  app.run(main)
