"""Face data sets as tfds builders (manual_dir only; nothing is downloaded) + decoding.

Builders (all write array_record; read them with `builder.as_data_source(split)` + grain;
no TensorFlow anywhere):
  insightface_rec/<set>    train.rec + train.idx (faces_webface_112x112, MS1M...)  split train
  face_image_list/<set>    an image folder + a list file of `path  label` lines     split train
  face_verification/<bin>  lfw.bin, agedb_30.bin, cfp_fp.bin, calfw.bin, cplfw.bin  split test
  tinyface                 AdaFace's aligned TinyFace (Probe/, Gallery_*)           probe, gallery

Images are stored encoded (the bytes of the original JPEG/PNG, in an object-dtype Tensor
feature) and decoded in the loader's worker processes by `DecodeImages`, a grain
MapTransform, to uint8 (H, W, 3) RGB. Channel order: insightface's .rec/.bin images and
the image files decode to RGB, and askd_jax feeds RGB. The official PyTorch code reads
with OpenCV and feeds BGR; converted official weights get their stem convolution's input
channels reversed by the converter, so they expect RGB here too.

JPEG round trip (`jpeg_roundtrip=True`, on in the `casia` and `tinyface` presets as
`data.jpeg_roundtrip`; `reencode_jpeg`): the official `utility/load_images_from_bin.py` decodes every `.rec`
record and `.bin` image, writes it with `cv2.imwrite(path.jpg, bgr)` (OpenCV's defaults:
quality 95, 4:2:0 chroma subsampling, baseline, slow integer DCT) and its loaders read those
files back with `cv2.imread`, so the official networks train and are evaluated on
re-encoded JPEGs. `reencode_jpeg` does the same with Pillow (already a base dependency;
OpenCV would add ~60 MB to the base install): Pillow's and OpenCV's wheels both bundle
libjpeg-turbo and, with these settings, give the same pixels (docs/protocol.md: 0 of 3.9 M
pixels differ; tests/test_face_builders.py checks against OpenCV itself). It runs on the
decoded image at its stored size, before any resize, as the official export does.

Corrupt images: at prepare time every image is decoded once (`on_corrupt='skip'` drops it
and counts it in `builder.info.metadata['skipped_corrupt']`, `'error'` stops with a
one-line error naming the record, `'keep'` skips the check); at load time `DecodeImages`
applies the same choice per record ('skip' needs `DropCorrupt` after it, which
`decode_transforms` adds).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from askd_jax.data import prepared, recordio

ON_CORRUPT = ("skip", "error", "keep")
DISTRACTOR_LABEL = -100
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_CORRUPT = "_corrupt"


class CorruptImageError(ValueError):
  """An image that does not decode (the message names the record)."""


# ----------------------------------------------------------------------------- decoding

def reencode_jpeg(rgb: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) RGB -> the same image written and read back as OpenCV's `imwrite(.jpg)`
  + `imread` do (quality 95, 4:2:0, baseline, no Huffman optimisation), as uint8 RGB."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(rgb, np.uint8), "RGB").save(
      buf, format="JPEG", quality=95, subsampling="4:2:0", optimize=False, progressive=False)
  with Image.open(io.BytesIO(buf.getvalue())) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, size: Optional[int] = None, where: str = "image",
                 jpeg_roundtrip: bool = False) -> np.ndarray:
  """Encoded JPEG/PNG bytes -> uint8 (H, W, 3) RGB; with `jpeg_roundtrip` re-encoded as the
  official export does (`reencode_jpeg`), then resized (bilinear) to (size, size)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode != "RGB":
        im = im.convert("RGB")
      if jpeg_roundtrip:
        im = Image.fromarray(reencode_jpeg(np.asarray(im)))
      if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
      return np.asarray(im, dtype=np.uint8)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise CorruptImageError(f"{where}: image does not decode ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); re-export it or "
                            "prepare with on_corrupt='skip'") from None


def _where(record: Dict[str, Any], key: str) -> str:
  src = record.get("source")
  if isinstance(src, bytes):
    src = src.decode("utf-8", "replace")
  return f"{src}[{key}]" if src is not None else key


@dataclasses.dataclass
class DecodeImages(grain.MapTransform):
  """Decodes the encoded-image fields of a record to uint8 (size, size, 3) RGB.

  Drops `drop` fields (strings do not batch into device arrays). With on_corrupt='skip' a
  bad record is marked and logged, and `DropCorrupt` must follow to remove it.
  """
  image_keys: Sequence[str] = ("image",)
  size: Optional[int] = 112
  on_corrupt: str = "error"
  drop: Sequence[str] = ("source",)
  jpeg_roundtrip: bool = False  # the official export's JPEG re-encoding (`reencode_jpeg`)

  def __post_init__(self):
    if self.on_corrupt not in ("skip", "error"):
      raise ValueError(f"on_corrupt={self.on_corrupt!r}: use 'skip' or 'error' when loading")
    self.skipped = 0

  def map(self, record: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in self.drop}
    try:
      for k in self.image_keys:
        out[k] = decode_image(record[k], self.size, _where(record, k), self.jpeg_roundtrip)
    except CorruptImageError as e:
      if self.on_corrupt == "error":
        raise
      self.skipped += 1
      logging.warning("skipping corrupt record (%d skipped in this worker): %s", self.skipped, e)
      return {_CORRUPT: True}
    return out


class DropCorrupt(grain.FilterTransform):
  """Removes the records `DecodeImages(on_corrupt='skip')` marked."""

  def filter(self, record: Dict[str, Any]) -> bool:
    return _CORRUPT not in record


def decode_transforms(size: Optional[int] = 112, on_corrupt: str = "error",
                      image_keys: Sequence[str] = ("image",),
                      drop: Sequence[str] = ("source",),
                      jpeg_roundtrip: bool = False) -> List[grain.Transformation]:
  """The grain operations that turn stored records into {'image': uint8 HWC, 'label'...};
  `jpeg_roundtrip`: re-encode each image as the official export does (`reencode_jpeg`)."""
  ops: List[grain.Transformation] = [DecodeImages(tuple(image_keys), size, on_corrupt,
                                                  tuple(drop), jpeg_roundtrip)]
  if on_corrupt == "skip":
    ops.append(DropCorrupt())
  return ops


def _check_on_corrupt(value: str) -> str:
  if value not in ON_CORRUPT:
    raise ValueError(f"on_corrupt={value!r}: use one of {ON_CORRUPT}")
  return value


# ------------------------------------------------------------------ verification .bin

class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only bytes/str/list/tuple/bool/int (no find_class needed) and numpy bools.

  Anything else (a class, a function: what a malicious __reduce__ needs) is refused before
  it is looked up, so nothing in the file can run code.
  """

  def find_class(self, module: str, name: str):
    np_core = ("numpy.core.multiarray", "numpy._core.multiarray")
    if module in np_core and name == "scalar":
      return _np_bool_scalar
    if module in np_core and name == "_reconstruct":
      return _np_reconstruct
    if module == "numpy" and name == "dtype":
      return _np_bool_dtype
    if module == "numpy" and name == "ndarray":
      return _NDARRAY_TOKEN
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
      return _np_bool_frombuffer
    if module == "_codecs" and name == "encode":
      return _latin1_bytes  # how protocol-2 pickles store bytes
    raise pickle.UnpicklingError(f"refused global {module}.{name}")


_NDARRAY_TOKEN = object()


def _np_bool_dtype(spec, align=False, copy=False):
  if spec not in ("b1", "?"):
    raise pickle.UnpicklingError(f"refused numpy dtype {spec!r} (only bool is expected)")
  return np.dtype(bool)


def _np_bool_scalar(dtype, data=b""):
  if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool) or not isinstance(data, bytes):
    raise pickle.UnpicklingError("refused numpy scalar that is not a bool")
  return np.frombuffer(data, bool, 1)[0]


def _np_bool_frombuffer(buf, dtype, shape, order):
  if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool):
    raise pickle.UnpicklingError("refused numpy array that is not bool")
  return np.frombuffer(bytes(buf), bool).reshape(shape, order=order).copy()


def _latin1_bytes(text, encoding="latin1"):
  if not isinstance(text, str) or encoding != "latin1":
    raise pickle.UnpicklingError("refused _codecs.encode call")
  return text.encode("latin1")


def _np_reconstruct(cls, shape, dtype_code):
  if cls is not _NDARRAY_TOKEN:
    raise pickle.UnpicklingError("refused numpy array subclass")
  return np.ndarray.__new__(np.ndarray, (0,), bool)  # __setstate__ accepts bool dtypes only


def read_verification_bin(path: str) -> Tuple[List[bytes], np.ndarray]:
  """An insightface .bin -> (2N encoded images, (N,) bool is-same), checked and in order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such verification .bin (insightface ships lfw.bin, "
                            "agedb_30.bin, cfp_fp.bin... next to train.rec)")
  try:
    with open(path, "rb") as f:
      obj = _RestrictedUnpickler(f, encoding="bytes").load()
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path}: refused to unpickle ({e}); an insightface .bin holds only "
                     "(list of image bytes, list of bools)") from None
  except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"{path}: not a readable insightface .bin ({type(e).__name__}: {e})") from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
    raise ValueError(f"{path}: expected a pickled pair (images, issame), got {type(obj).__name__}")
  images, issame = obj
  if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray))
                                                      for b in images):
    raise ValueError(f"{path}: the first element must be a list of encoded image bytes")
  if isinstance(issame, np.ndarray):
    if issame.dtype != bool:
      raise ValueError(f"{path}: is-same flags have dtype {issame.dtype}, expected bool")
    flags = issame.reshape(-1)
  elif isinstance(issame, (list, tuple)) and all(isinstance(b, (bool, np.bool_)) for b in issame):
    flags = np.asarray(issame, dtype=bool)
  else:
    raise ValueError(f"{path}: the second element must be a list of bools (is-same flags)")
  if len(images) != 2 * len(flags):
    raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs; expected 2 per pair")
  return [bytes(b) for b in images], flags


def verification_folds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
  """Fold of each pair, in file order: contiguous folds, sizes as sklearn KFold (insightface).

  6,000 pairs -> fold = index // 600 (the official AgeDB list); 7,000 -> index // 700.
  """
  sizes = np.full(n_folds, n_pairs // n_folds)
  sizes[: n_pairs % n_folds] += 1
  return np.repeat(np.arange(n_folds, dtype=np.int32), sizes)


# ----------------------------------------------------------------------- listings

def read_image_list(list_file: str, root: str) -> List[Tuple[str, int]]:
  """`path  label` lines -> [(existing file, label)].

  Paths are taken as written, else relative to `root`; absolute paths from another machine
  (e.g. /data/.../faces_webface_112x112/image/000001/00000002.jpg, as the official code
  writes them) are re-rooted by dropping leading components until the rest exists under root.
  """
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"{list_file}: no such list file (lines of 'path  label')")
  entries: List[Tuple[str, int]] = []
  with open(list_file) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(None, 1)
      try:
        entries.append((parts[0], int(parts[1])))
      except (ValueError, IndexError):
        raise ValueError(f"{list_file} line {n}: {line[:80]!r} is not 'path  label'") from None
  if not entries:
    raise ValueError(f"{list_file}: empty list file")
  n_ids = len({label for _, label in entries})
  for n, (_, label) in enumerate(entries, 1):  # labels in [0, identities), before any reading
    if not 0 <= label < n_ids:
      raise ValueError(f"{list_file} line {n}: label {label} is outside [0, {n_ids}) (the list "
                       f"names {n_ids} identities); number the identities 0..{n_ids - 1}")
  strip = _find_strip(entries[0][0], root)
  if strip is None:
    raise FileNotFoundError(f"{list_file} line 1: {entries[0][0]} not found as written nor under "
                            f"{root}; pass the image folder the list refers to as manual_dir")
  out = []
  for n, (p, label) in enumerate(entries, 1):
    q = _reroot(p, root, strip)
    if not os.path.isfile(q):
      raise FileNotFoundError(f"{list_file} line {n}: image {q} not found")
    out.append((q, label))
  return out


def _reroot(path: str, root: str, strip: int) -> str:
  if strip < 0:
    return path
  comps = [c for c in path.replace("\\", "/").split("/") if c]
  return os.path.join(root, *comps[strip:])


def _find_strip(path: str, root: str) -> Optional[int]:
  if os.path.isabs(path) and os.path.isfile(path):
    return -1
  comps = [c for c in path.replace("\\", "/").split("/") if c]
  for k in range(len(comps)):
    if os.path.isfile(os.path.join(root, *comps[k:])):
      return k
  return None


def _image_files(folder: str) -> List[str]:
  out = []
  for dirpath, _, files in os.walk(folder):
    out += [os.path.join(dirpath, f) for f in files if os.path.splitext(f)[1].lower() in _IMAGE_EXTS]
  return sorted(out)


def tinyface_files(root: str) -> Dict[str, List[Tuple[str, int]]]:
  """{'probe': [(file, label)], 'gallery': match files then distractors (label -100)}."""
  for sub in ("aligned_pad_0.1_pad_high", "tinyface/aligned_pad_0.1_pad_high"):
    if os.path.isdir(os.path.join(root, sub)):
      root = os.path.join(root, sub)
      break
  dirs = {}
  for name in ("Probe", "Gallery_Match", "Gallery_Distractor"):
    d = os.path.join(root, name)
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d}: missing; TinyFace needs AdaFace's aligned release with "
                              "Probe/, Gallery_Match/, Gallery_Distractor/ under manual_dir")
    dirs[name] = d

  def labelled(folder: str) -> List[Tuple[str, int]]:
    out = []
    for f in _image_files(folder):
      prefix = os.path.basename(f).split("_")[0]
      try:
        out.append((f, int(prefix)))
      except ValueError:
        raise ValueError(f"{f}: file name must start with '<identity>_' (TinyFace naming)") from None
    if not out:
      raise FileNotFoundError(f"{folder}: holds no .jpg/.png images")
    return out

  probe, match = labelled(dirs["Probe"]), labelled(dirs["Gallery_Match"])
  distractors = [(f, DISTRACTOR_LABEL) for f in _image_files(dirs["Gallery_Distractor"])]
  return {"probe": probe, "gallery": match + distractors}


# ----------------------------------------------------------------------- builders

def _image_feature():
  return tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded bytes; no TF needed


def _str_feature():
  return tfds.features.Tensor(shape=(), dtype=np.str_)


class _FaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared: manual_dir instructions, prepare-time corrupt-image policy and its count."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, on_corrupt: str = "skip", **kwargs):
    self._on_corrupt = _check_on_corrupt(on_corrupt)
    super().__init__(**kwargs)

  def _info_from(self, features: Dict[str, Any], **kw) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(), **kw)

  def _checked(self, split: str, where: str, data: bytes) -> bool:
    """True to keep the image; counts what 'skip' drops."""
    if self._on_corrupt == "keep":
      return True
    try:
      decode_image(data, None, where)
      return True
    except CorruptImageError as e:
      if self._on_corrupt == "error":
        raise
      md = self.info.metadata
      md.setdefault("skipped_corrupt", {}).setdefault(split, 0)
      md["skipped_corrupt"][split] += 1
      md.setdefault("skipped_sources", [])
      if len(md["skipped_sources"]) < 100:
        md["skipped_sources"].append(where)
      logging.warning("skipping corrupt image: %s", e)
      return False


class _LabelledFaces(_FaceBuilder, skip_registration=True):
  """Face images with an identity label and where each came from (training / TinyFace)."""

  def _info(self):
    return self._info_from({"image": _image_feature(),
                            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
                            "source": _str_feature()})

  def _labelled_examples(self, split: str, items, count_identities: bool = True):
    """items: (key, label, encoded image, where (for errors), source); corrupt images go by
    the on_corrupt policy; the identities kept are counted into the metadata."""
    from askd_jax import stop
    labels, seen, top = set(), set(), (-1, "")
    for n, (key, label, img, where, source) in enumerate(items):
      if n % 256 == 0:  # a safe point for SIGTERM/SIGINT (tfds drops the unfinished files)
        stop.check(f"data preparation ({split} {where})")
      if count_identities:  # labels in [0, identities): checked before anything trains
        if label < 0:
          raise ValueError(f"{where}: label {label} is negative; identity labels are 0, 1, ...")
        seen.add(label)
        top = max(top, (label, where))
      if self._checked(split, where, img):
        labels.add(label)
        yield key, {"image": img, "label": label, "source": source}
    if count_identities and top[0] >= len(seen):
      raise ValueError(f"{top[1]}: label {top[0]} is outside [0, {len(seen)}) (the {split} split "
                       f"has {len(seen)} identities); number the identities 0..{len(seen) - 1}")
    if count_identities:
      self.info.metadata["num_classes"] = max(labels) + 1 if labels else 0
      self.info.metadata["num_identities"] = len(labels)


def _read_files(entries, root: str):
  """(path, label) -> (index, label, file bytes, path, path relative to root)."""
  for i, (path, label) in enumerate(entries):
    with open(path, "rb") as f:
      yield i, label, f.read(), path, os.path.relpath(path, root)


class InsightfaceRec(_LabelledFaces):
  """An insightface training set from manual_dir/train.rec + train.idx (no mxnet)."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="casia_webface", description="faces_webface_112x112"),
      tfds.core.BuilderConfig(name="ms1m", description="faces_emore / ms1m-retinaface"),
      tfds.core.BuilderConfig(name="custom", description="any insightface train.rec"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put train.rec and train.idx of an insightface set (e.g. "
                                  "faces_webface_112x112) in manual_dir.")

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(str(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    rec = os.path.join(manual_dir, "train.rec")
    idx = os.path.join(manual_dir, "train.idx")
    data = recordio.InsightfaceRecord(rec, idx if os.path.isfile(idx) else None)

    def items():
      for i in range(len(data)):
        label, img, key = data[i]
        yield i, label, img, f"{rec} record {key}", f"train.rec#{key}"
    return self._labelled_examples("train", items())


class FaceImageList(_LabelledFaces):
  """Images + a list file of `path  label` lines (the official code's input)."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="casia_webface", description="CASIA-WebFace image folder"),
      tfds.core.BuilderConfig(name="custom", description="any image folder + list"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the image folder in manual_dir and its list file at "
                                  "manual_dir/train.list (or pass list_file=).")

  def __init__(self, *, list_file: Optional[str] = None, **kwargs):
    self._list_file = list_file
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(str(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    list_file = self._list_file or os.path.join(manual_dir, "train.list")
    entries = read_image_list(list_file, manual_dir)
    return self._labelled_examples("train", _read_files(entries, manual_dir))


VERIFICATION_SETS = ("lfw", "agedb_30", "cfp_fp", "cfp_ff", "calfw", "cplfw", "vgg2_fp")


class FaceVerification(_FaceBuilder):
  """Pairs of an insightface .bin: both images, is_same, fold (10, file order), index."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n}.bin")
                     for n in VERIFICATION_SETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <name>.bin (e.g. lfw.bin) in manual_dir."

  def __init__(self, *, bin_file: Optional[str] = None, **kwargs):
    self._bin_file = bin_file
    super().__init__(**kwargs)

  def _info(self):
    return self._info_from({"image1": _image_feature(), "image2": _image_feature(),
                            "is_same": tfds.features.Tensor(shape=(), dtype=np.bool_),
                            "fold": tfds.features.Tensor(shape=(), dtype=np.int32),
                            "index": tfds.features.Tensor(shape=(), dtype=np.int32)})

  def _split_generators(self, dl_manager):
    path = self._bin_file or os.path.join(str(dl_manager.manual_dir), f"{self.builder_config.name}.bin")
    return {"test": self._generate_examples(path)}

  def _generate_examples(self, path: str):
    images, issame = read_verification_bin(path)
    folds = verification_folds(len(issame))
    name = os.path.basename(path)
    from askd_jax import stop
    for i in range(len(issame)):
      if i % 256 == 0:
        stop.check(f"data preparation ({path} pair {i})")
      a, b = images[2 * i], images[2 * i + 1]
      # A pair cannot be dropped without shifting the folds: 'skip' is treated as 'error'.
      if self._on_corrupt != "keep":
        for k, img in ((2 * i, a), (2 * i + 1, b)):
          try:
            decode_image(img, None, f"{path} image {k}")
          except CorruptImageError as e:
            raise CorruptImageError(
                str(e).split("; re-export")[0] + "; a verification pair cannot be skipped "
                "(the folds would shift): use an intact .bin, or prepare with "
                "--on_corrupt=keep to keep it as it is") from None
      yield i, {"image1": a, "image2": b, "is_same": bool(issame[i]), "fold": int(folds[i]),
                "index": i}
    self.info.metadata["num_pairs"] = len(issame)


class TinyFace(_LabelledFaces):
  """TinyFace identification (AdaFace aligned): probe, gallery = match + distractors (-100)."""

  name = "tinyface"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put AdaFace's aligned TinyFace (Probe/, Gallery_Match/, "
                                  "Gallery_Distractor/, or aligned_pad_0.1_pad_high/) in manual_dir.")

  def _split_generators(self, dl_manager):
    files = tinyface_files(str(dl_manager.manual_dir))
    root = str(dl_manager.manual_dir)
    return {split: self._generate_examples(split, entries, root) for split, entries in files.items()}

  def _generate_examples(self, split: str, entries, root: str):
    return self._labelled_examples(split, _read_files(entries, root), count_identities=False)


# ----------------------------------------------------------------------- loading

class RecordIOSource:
  """train.rec/train.idx read in place as a grain source: {'image', 'label', 'source'}.

  For a quick look or a benchmark without preparing; training uses the prepared set.
  """

  def __init__(self, path: str):
    rec = os.path.join(path, "train.rec") if os.path.isdir(path) else path
    self._data = recordio.InsightfaceRecord(rec)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    label, img, key = self._data[int(index)]
    return {"image": img, "label": np.int32(label), "source": f"train.rec#{key}"}

  def __repr__(self) -> str:
    return f"RecordIOSource({self._data.rec_path!r}, len={len(self)})"


DATASETS = {  # prepare.py's --dataset -> (builder class, config)
    "casia": (InsightfaceRec, "casia_webface"),
    "ms1m": (InsightfaceRec, "ms1m"),
    "rec": (InsightfaceRec, "custom"),
    "casia_list": (FaceImageList, "casia_webface"),
    "list": (FaceImageList, "custom"),
    **{n: (FaceVerification, n) for n in VERIFICATION_SETS},
    "tinyface": (TinyFace, None),
}


def builder(dataset: str, data_dir: str, **kwargs) -> tfds.core.DatasetBuilder:
  """The builder for a `DATASETS` key (prepare-time kwargs: on_corrupt, list_file, bin_file)."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}: use one of {sorted(DATASETS)}")
  cls, config = DATASETS[dataset]
  if config is not None:
    kwargs["config"] = config
  return cls(data_dir=data_dir, **kwargs)


def prepare(dataset: str, manual_dir: str, data_dir: str, **kwargs) -> tfds.core.DatasetBuilder:
  """Reads the user's files in manual_dir, writes array_record under data_dir."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir={manual_dir}: no such folder")
  b = builder(dataset, data_dir, **kwargs)
  prepared.write_array_record(b, manual_dir)
  return b


def data_source(dataset: str, split: str, data_dir: str):
  """A prepared set's random-access source for grain (`DATASETS` key or tfds name)."""
  b = builder(dataset, data_dir) if dataset in DATASETS else tfds.builder(dataset, data_dir=data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(
        f"{b.data_dir}: {dataset} is not prepared; run python -m askd_jax.data.prepare "
        f"--dataset={dataset} --manual_dir=<your files> --data_dir={data_dir}")
  return b.as_data_source(split)


__all__ = ["DecodeImages", "DropCorrupt", "decode_transforms", "decode_image",
           "CorruptImageError", "read_verification_bin", "verification_folds",
           "read_image_list", "tinyface_files", "InsightfaceRec", "FaceImageList",
           "FaceVerification", "TinyFace", "RecordIOSource", "DATASETS", "builder", "prepare", "data_source",
           "DISTRACTOR_LABEL"]
