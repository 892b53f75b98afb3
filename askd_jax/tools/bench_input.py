"""Input-pipeline throughput: decode (+ flip) and HR/LR pair production, in images/s.

    python -m askd_jax.tools.bench_input [--source=synthetic|PATH] --batch=128 --size=112 \\
        [--workers=0] [--steps=20] [--lr_sizes=14,28,56]

PATH: a prepared tfds set (the folder with dataset_info.json, e.g.
DATA_DIR/insightface_rec/casia_webface/1.0.0) or a folder holding train.rec/train.idx.
`synthetic` builds 1,024 smooth 112x112 JPEGs (quality 95, ~5 kB, like CASIA's) in memory.

Stage 1 times the grain loader alone (read + JPEG decode with Pillow + random flip + batch,
`--workers` processes). Stage 2 adds the HR/LR pair the train step consumes: uint8 -> [-1, 1]
and `askd_jax.data.degrade.degrade(mode='official')` (nearest down/up to a random size of
`--lr_sizes` per image + the fixed Gaussian blur), jitted on the default JAX device, from one
decode. Both print images/s.
"""
from __future__ import annotations

import io
import os
import time
from typing import Any, Dict, List

from absl import app, flags
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from askd_jax.data import augment, degrade, faces, pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "synthetic", "synthetic, a prepared tfds folder, or a train.rec folder")
flags.DEFINE_string("split", "train", "split of a prepared tfds set")
flags.DEFINE_integer("batch", 128, "global batch size")
flags.DEFINE_integer("size", 112, "HR image size (decoded images are resized to it)")
flags.DEFINE_integer("workers", 0, "grain worker processes (0: decode in this process)")
flags.DEFINE_integer("steps", 20, "timed batches per stage (after 2 warm-up batches)")
flags.DEFINE_string("lr_sizes", "14,28,56", "LR sizes, one drawn per image")


def synthetic_source(n: int = 1024, size: int = 112, seed: int = 0) -> List[Dict[str, Any]]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), np.int16)
    img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    out.append({"image": buf.getvalue(), "label": np.int32(i % 100), "source": f"synthetic#{i}"})
  return out


def open_source(spec: str, split: str):
  if spec == "synthetic":
    return synthetic_source(size=FLAGS.size)
  if os.path.isfile(os.path.join(spec, "dataset_info.json")):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder_from_directory(spec).as_data_source(split)
  if os.path.isfile(os.path.join(spec, "train.rec")):
    return faces.RecordIOSource(spec)
  raise ValueError(f"--source={spec}: neither 'synthetic', a prepared tfds folder "
                   "(dataset_info.json) nor a folder with train.rec")


def _time(it, steps: int, fn) -> float:
  for _ in range(2):
    fn(next(it))
  t = time.perf_counter()
  for _ in range(steps):
    fn(next(it))
  return time.perf_counter() - t


def main(argv):
  del argv
  source = open_source(FLAGS.source, FLAGS.split)
  sizes = tuple(int(s) for s in FLAGS.lr_sizes.split(","))
  loader = pipeline.make_train_loader(
      source, global_batch_size=FLAGS.batch, seed=0,
      transforms=[*faces.decode_transforms(FLAGS.size, "skip"), *augment.official()],
      worker_count=FLAGS.workers, shard_options=grain.NoSharding())
  it = iter(loader)
  n = FLAGS.batch * FLAGS.steps

  dt = _time(it, FLAGS.steps, lambda b: b["image"].shape)
  print(f"decode+flip: {n / dt:.0f} images/s ({FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch}, "
        f"workers {FLAGS.workers}, {len(source)} records)")

  @jax.jit
  def pairs(images, rng):  # (B, H, W, 3) uint8 -> HR, LR in [-1, 1]
    hr = images.astype(jnp.float32) / 127.5 - 1.0
    return hr, degrade.degrade(hr, rng, sizes, mode="official")

  key = jax.random.key(0)

  def step(batch):
    hr, lr = pairs(batch["image"], key)
    lr.block_until_ready()

  dt = _time(it, FLAGS.steps, step)
  print(f"decode+flip+HR/LR pairs: {n / dt:.0f} images/s (degrade official, sizes {sizes}, "
        f"on {jax.devices()[0].platform})")


if __name__ == "__main__":
  app.run(main)
