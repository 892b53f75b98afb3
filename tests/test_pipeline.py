"""The grain input pipeline: determinism, exact resume, sharding, augmentations, eval padding."""
from __future__ import annotations

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from askd_jax.data import augment, pipeline

H = W = 8


class ToySource:
  """Record i: a (8, 8, 3) image whose pixels encode i (and vary in x), label i."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __repr__(self):  # grain checks a restored state against repr(source)
    return f"ToySource({self.n})"

  def __getitem__(self, i):
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = i
    img[..., 1] = np.arange(W, dtype=np.uint8) * 20
    img[..., 2] = np.arange(H, dtype=np.uint8)[:, None] * 25
    return {"image": img, "label": int(i), "extra": "dropped"}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _single():
  return grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


def _loader(seed, n=20, bs=4, shard=None, **kw):
  return pipeline.make_train_loader(ToySource(n), global_batch_size=bs, seed=seed,
                                    shard_options=shard or _single(), **kw)


def test_batches_format_and_determinism():
  a = _take(iter(_loader(0, transforms=augment.demo())), 12)  # > 2 epochs of 20
  b = _take(iter(_loader(0, transforms=augment.demo())), 12)
  c = _take(iter(_loader(1, transforms=augment.demo())), 12)
  assert set(a[0]) == {"image", "label"}
  assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (4, H, W, 3)
  assert a[0]["label"].dtype == np.int32 and a[0]["label"].shape == (4,)
  assert _same(a, b)
  assert not _same(a, c)


def test_each_epoch_is_a_permutation():
  batches = list(_loader(3, n=20, bs=4, num_epochs=2))
  labels = np.concatenate([b["label"] for b in batches])
  assert len(labels) == 40
  assert sorted(labels[:20]) == list(range(20)) and sorted(labels[20:]) == list(range(20))
  assert labels[:20].tolist() != list(range(20))  # shuffled
  assert labels[:20].tolist() != labels[20:].tolist()  # reshuffled per epoch


def test_resume_from_state_is_exact():
  loader = _loader(5, transforms=augment.demo())
  it = iter(loader)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it2 = iter(_loader(5, transforms=augment.demo()))
  it2.set_state(state)
  assert _same(_take(it2, 4), expected)


def test_resume_through_orbax_handler(tmp_path):
  it = iter(_loader(7))
  _take(it, 6)
  ckptr = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
  ckptr.save(tmp_path / "data", args=grain.PyGrainCheckpointSave(it))
  expected = _take(it, 3)
  it2 = iter(_loader(7))
  ckptr.restore(tmp_path / "data", args=grain.PyGrainCheckpointRestore(it2))
  assert _same(_take(it2, 3), expected)


def test_two_process_sharding_disjoint_and_covering():
  shards = [grain.ShardOptions(shard_index=i, shard_count=2, drop_remainder=True)
            for i in range(2)]
  per = [list(_loader(11, n=40, bs=8, shard=s, num_epochs=1)) for s in shards]
  for batches in per:
    assert len(batches) == 5 and all(b["label"].shape == (4,) for b in batches)
  seen = [set(np.concatenate([b["label"] for b in batches]).tolist()) for batches in per]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    _loader(0, bs=7, shard=shards[0])


def test_default_sharding_uses_jax_processes():
  loader = pipeline.make_train_loader(ToySource(20), global_batch_size=4 * jax.process_count(),
                                      seed=0, num_epochs=1)
  assert sum(len(b["label"]) for b in loader) == 20 // jax.process_count()


@pytest.mark.parametrize("n,bs,shards", [(23, 8, 2), (23, 8, 1), (16, 4, 2)])
def test_eval_loader_covers_every_record_once(n, bs, shards):
  labels, masks = [], []
  steps = set()
  for i in range(shards):
    opts = grain.ShardOptions(shard_index=i, shard_count=shards, drop_remainder=True)
    batches = list(pipeline.make_eval_loader(ToySource(n), global_batch_size=bs,
                                             shard_options=opts))
    steps.add(len(batches))
    for b in batches:
      assert b["image"].shape == (bs // shards, H, W, 3) and b["mask"].dtype == np.bool_
      labels.append(b["label"])
      masks.append(b["mask"])
  assert len(steps) == 1  # every process runs the same number of steps
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  assert sorted(labels[masks].tolist()) == list(range(n))
  assert (labels[~masks] == -1).all() and len(labels) == -(-n // bs) * bs


def test_prefetch_to_device_global_arrays_and_state():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = pipeline.batch_sharding(mesh)
  ref = _take(iter(_loader(2)), 5)
  pf = pipeline.prefetch_to_device(iter(_loader(2)), 3, sharding)
  got = _take(pf, 2)
  for g, r in zip(got, ref):
    assert isinstance(g["image"], jax.Array) and g["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(g["image"]), r["image"])
    np.testing.assert_array_equal(np.asarray(g["label"]), r["label"])
  # 3 batches are queued, yet the state points right after the 2 consumed
  it2 = iter(_loader(2))
  it2.set_state(pf.get_state())
  assert _same(_take(it2, 3), ref[2:])
  pf.set_state(pf.get_state())
  np.testing.assert_array_equal(np.asarray(next(pf)["label"]), ref[2]["label"])


def test_augmentations_deterministic_and_shape_preserving():
  rec = ToySource(1)[0]
  rec["image"][..., 0] = np.arange(H * W).reshape(H, W) * 3  # asymmetric in x and y
  for t in (augment.RandomFlip(), augment.RandomShiftScale(), augment.RandomBrightness()):
    outs = [t.random_map(dict(rec), np.random.default_rng(s))["image"] for s in (0, 0, 1, 2, 3)]
    assert all(o.shape == (H, W, 3) and o.dtype == np.uint8 for o in outs)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert any(not np.array_equal(o, rec["image"]) for o in outs)  # it does something
  flipped = augment.RandomFlip(p=1.0).random_map(dict(rec), np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["image"], rec["image"][:, ::-1])
  assert flipped["label"] == rec["label"]
  kept = augment.RandomFlip(p=0.0).random_map(dict(rec), np.random.default_rng(0))
  np.testing.assert_array_equal(kept["image"], rec["image"])


def test_affine_values():
  img = ToySource(1)[0]["image"]
  img[..., 0] = np.arange(H * W).reshape(H, W)
  np.testing.assert_array_equal(augment.affine_bilinear(img, 1.0, 0.0, 0.0), img)
  shifted = augment.affine_bilinear(img, 1.0, 2.0, 0.0)  # right by 2, edge-clamped
  np.testing.assert_array_equal(shifted[:, 2:], img[:, :-2])
  np.testing.assert_array_equal(shifted[:, :2], np.repeat(img[:, :1], 2, axis=1))
  half = augment.affine_bilinear(img, 1.0, 0.0, 0.5)  # down by half a pixel: row averages
  expect = np.rint((img[1:].astype(float) + img[:-1]) / 2)
  np.testing.assert_array_equal(half[1:], expect)
  # the pixel value 8y + x is linear, so bilinear sampling is exact at any point:
  # zoom 2 about the centre 3.5 samples at 3.5 + (p - 3.5) / 2
  zoom = augment.affine_bilinear(img, 2.0, 0.0, 0.0)[..., 0]
  q = 3.5 + (np.arange(8) - 3.5) / 2
  np.testing.assert_array_equal(zoom, np.rint(8 * q[:, None] + q[None, :]))


def test_bright_and_bad_input():
  rec = {"image": np.full((4, 4, 3), 100, np.uint8), "label": 0}
  out = augment.RandomBrightness(0.5).random_map(rec, np.random.default_rng(0))["image"]
  f = np.random.default_rng(0).uniform(0.5, 1.5)
  assert (out == np.uint8(np.rint(100 * f))).all()
  with pytest.raises(ValueError, match="uint8"):
    augment.RandomFlip().random_map({"image": np.zeros((4, 4, 3), np.float32)},
                                    np.random.default_rng(0))
  with pytest.raises(ValueError, match="unknown"):
    augment.get("mixup")
  assert len(augment.get("official")) == 1 and len(augment.get("demo")) == 3
  assert isinstance(augment.face_train_transforms("flip")[0], augment.RandomFlip)
