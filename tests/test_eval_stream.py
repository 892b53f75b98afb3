"""Evaluation sets streamed from the prepared files (askd_jax.data.eval_stream): the same
embeddings as decoding the whole set into memory, in memory that does not grow with the set."""
from __future__ import annotations

import pickle
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.data import faces, fixtures
from askd_jax.tasks.facerec import FaceRecTask

SIZE = 16  # the shapes of tests/test_trace_counts.py (compiled once per session cache)
SPEC = {"task": "facerec", "arch": "iresnet_cbam", "depth": None, "width": 0.125,
        "stage_sizes": [1, 1, 1, 1], "embedding_dim": 8, "num_classes": 5, "margin": "arcface",
        "s": 32.0, "m": 0.5, "input_size": SIZE, "channel_order": "rgb"}


def _prepared_lfw(root, n_pairs: int, seed: int = 0):
  """An lfw.bin of `n_pairs` 24 px PNG pairs, prepared; (data_dir, the encoded images)."""
  manual = root / "manual"
  manual.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  images = [fixtures.encode_image(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
            for _ in range(2 * n_pairs)]
  with open(manual / "lfw.bin", "wb") as f:
    pickle.dump((images, [i % 2 == 0 for i in range(n_pairs)]), f)
  faces.prepare("lfw", str(manual), str(root / "tfds"))
  return str(root / "tfds"), images


def _task(data_dir, workers=0):
  import configs.facerec as fr
  c = fr.get_config("casia")
  c.data.data_dir, c.data.verification, c.data.image_size = data_dir, ("lfw",), SIZE
  c.data.workers = workers
  c.model.width, c.model.stage_sizes, c.model.embedding_dim = 0.125, (1, 1, 1, 1), 8
  c.eval.batch_size = 4
  task = FaceRecTask(c)
  model = task.model(spec=SPEC)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  variables = jax.jit(lambda k: model.init(k, x, None, train=False))(jax.random.key(0))
  return task, model, variables


@pytest.mark.parametrize("sizes,workers", [((), 0), ((8,), 2)])
def test_streamed_embeddings_equal_the_in_memory_ones_bit_for_bit(tmp_path, sizes, workers):
  """The --evaluate path's set (eval_data(): pairs streamed from the prepared array_record,
  batch by batch) against the .bin's images decoded into one array, at HR and at a student
  size (a random degradation per batch, keyed by the batch's start): equal to the last bit,
  over a ragged last batch (11 pairs = 22 images in batches of 4), also with
  config.data.workers=2 (the training loader's worker processes).

  Checked by hand: with the evaluation loader given those 2 worker processes (each batches
  its own records 0, 2, 4... so the images come reordered) the embeddings differed."""
  data_dir, encoded = _prepared_lfw(tmp_path, 11)
  task, model, variables = _task(data_dir, workers)
  vs = task.eval_data()["verification"][0]
  assert len(vs["images"]) == 22 and not isinstance(vs["images"], np.ndarray)
  assert task.cfg.data.jpeg_roundtrip  # the casia preset's official .bin JPEG round trip
  decoded = np.stack([faces.decode_image(b, SIZE, "lfw", jpeg_roundtrip=True) for b in encoded])
  got = task.embeddings(model, variables, vs["images"], sizes, batch=4)
  want = task.embeddings(model, variables, decoded, sizes, batch=4)
  assert got.shape == (22, 16) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(vs["images"][[3, 20]], decoded[[3, 20]])
  assert list(vs["issame"]) == [i % 2 == 0 for i in range(11)]


def test_evaluation_memory_does_not_grow_with_the_set(tmp_path):
  """Peak Python-heap memory (numpy buffers included) of loading a verification set of N and
  of 4N pairs and embedding it (as FaceRecTask.evaluate does): what 3N more pairs add is their
  embeddings and pair arrays, not their decoded images (a quarter of those is the bound).

  Checked by hand: with the streamed set decoded into one array in `_load_eval_sets` (what
  the code before streaming did) the growth was 681 KB against the bound of 184 KB and this
  test failed; streamed, it measured -56 KB (the peak is set by fixed costs)."""
  n = 160
  peaks = []
  for k, pairs in enumerate((n, n, 4 * n)):  # the first one compiles (not measured)
    data_dir, _ = _prepared_lfw(tmp_path / str(k), pairs, seed=k)
    task, model, variables = _task(data_dir)
    if k:
      tracemalloc.start()
    try:
      vs = task.eval_data()["verification"][0]
      emb = task.embeddings(model, variables, vs["images"], batch=4)
      peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    assert emb.shape == (2 * pairs, 16) and np.isfinite(emb).all()
  decoded_images = 3 * n * 2 * SIZE * SIZE * 3  # bytes of the 3N extra pairs, decoded
  growth = peaks[2] - peaks[1]
  assert growth < decoded_images / 4, (growth, decoded_images, peaks)
