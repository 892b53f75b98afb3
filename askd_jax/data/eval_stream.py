"""Evaluation images streamed from the prepared files, a batch at a time.

An evaluation set (a verification .bin's pairs, TinyFace's probe or gallery) is a
`StreamedImages`: its length and an in-order iteration over decoded batches, read from the
prepared array_record files through the training input pipeline (`pipeline.make_eval_loader`,
grain, `faces.decode_transforms`). Only the batches in flight are decoded, so memory does not
grow with the set (TinyFace's 158k gallery images decoded at 112 px would be ~6 GB, IJB-C's
~470k crops ~17 GB); what does grow is what the caller keeps per image (the embeddings).

`batches(images, batch)` serves `FaceRecTask.embeddings` both a `StreamedImages` and an
in-memory uint8 array (the ORL demo, the tests), padded to one compiled batch shape.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import grain.python as grain
import numpy as np

from askd_jax.data import pipeline


class PairImages:
  """A verification source (records {'image1', 'image2', ...}) as a source of single images:
  index 2i is pair i's image1, 2i+1 its image2 (so idx1 = 0, 2, ... and idx2 = 1, 3, ...)."""

  def __init__(self, source, name: str):
    self._source = source
    self._name = name
    self._last: Tuple[int, Optional[Dict[str, Any]]] = (-1, None)  # both halves, one read

  def __len__(self) -> int:
    return 2 * len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    pair, half = divmod(int(index), 2)
    last, record = self._last
    if last != pair:
      record = self._source[pair]
      self._last = (pair, record)
    return {"image": record[f"image{half + 1}"], "source": f"{self._name} pair {pair}"}

  def __getstate__(self):  # into grain's worker processes without the cached record
    return {**self.__dict__, "_last": (-1, None)}

  def __repr__(self) -> str:
    return f"PairImages({self._name!r}, pairs={len(self._source)})"


class StreamedImages:
  """The images of a prepared split, decoded batch by batch in order (never all at once).

  source: random-access records holding an encoded 'image' (a tfds data source, or
  `PairImages`); transforms: the grain operations that decode it to uint8 (S, S, 3)
  (`faces.decode_transforms`). Decoded in this process (grain's reading threads ahead of
  it): with worker processes each grain worker batches its own records (0, W, 2W...), which
  reorders the images within the batches, and with them the per-batch degradation keys.
  """

  def __init__(self, source, transforms: Sequence[Any]):
    self.source = source
    self.transforms = list(transforms)

  def __len__(self) -> int:
    return len(self.source)

  def batches(self, batch: int) -> Iterator[Tuple[int, np.ndarray, int]]:
    """(start index, uint8 (batch, S, S, 3), real rows) in order; the last batch is padded
    (by pipeline.PaddedSource) to `batch` rows so that one compiled shape serves all."""
    # Records read ahead: two batches (grain's default, 500, would hold a small set whole).
    ahead = grain.ReadOptions(num_threads=min(16, batch), prefetch_buffer_size=2 * batch)
    loader = pipeline.make_eval_loader(
        self.source, global_batch_size=batch, transforms=self.transforms,
        worker_count=0, keys=("image", "mask"), shard_options=grain.NoSharding(),
        read_options=ahead)
    start = 0
    for b in loader:
      n = int(np.count_nonzero(b["mask"]))
      yield start, b["image"], n
      start += n
    if start != len(self):
      raise RuntimeError(f"{self.source!r}: streamed {start} of {len(self)} images")

  def __getitem__(self, index) -> np.ndarray:
    """Decoded images of a slice or index list (e.g. a few to look at), uint8 (K, S, S, 3)."""
    idx = np.arange(len(self))[index]
    out = []
    for i in np.atleast_1d(idx):
      r = self.source[int(i)]
      for op in self.transforms:  # the decoding MapTransforms (on_corrupt='error')
        r = op.map(r)
      out.append(np.asarray(r["image"], np.uint8))
    return out[0] if np.ndim(idx) == 0 else np.stack(out)

  def __repr__(self) -> str:
    return f"StreamedImages({self.source!r}, len={len(self)})"


def columns(source, keys: Sequence[str], chunk: int = 128) -> Dict[str, np.ndarray]:
  """The small per-record fields `keys` (labels, pair flags, folds) of every record, read
  without decoding an image; the encoded bytes are dropped chunk by chunk."""
  out = {k: [] for k in keys}
  get_many = getattr(source, "__getitems__", None)
  for s in range(0, len(source), chunk):
    idx = range(s, min(s + chunk, len(source)))
    for r in (get_many(list(idx)) if get_many else (source[i] for i in idx)):
      for k in keys:
        out[k].append(r[k])
  return {k: np.asarray(v) for k, v in out.items()}


def batches(images, batch: int) -> Iterator[Tuple[int, np.ndarray, int]]:
  """(start, uint8 (batch, ...) padded, real rows) over a `StreamedImages` or a uint8 array
  (its last chunk padded by repeating its last image)."""
  if batch < 1:
    raise ValueError(f"eval batch size {batch} must be >= 1")
  if len(images) == 0:
    raise ValueError("the evaluation set holds no image")
  if hasattr(images, "batches"):
    yield from images.batches(batch)
    return
  for i in range(0, len(images), batch):
    chunk = np.asarray(images[i:i + batch])
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
    yield i, chunk, n
