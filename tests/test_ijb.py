"""IJB-B/IJB-C: the builder on a fixture release in insightface's formats, and the 1:1
protocol (askd_jax.evaluate.ijb) against a transcription of insightface's ijb_11.py."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from askd_jax.data import align, faces, fixtures, ijb
from askd_jax.evaluate import ijb as ijb_eval

from conftest import cli_env

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
SWITCHES = list(itertools.product([True, False], repeat=3))  # flip, norm score, detector


# ----------------------------------------------------------------- the reference protocol
# insightface recognition/_evaluation_/ijb/ijb_11.py, transcribed with numpy + sklearn:
# read_template_media_list, get_image_feature's faceness scores, the use_* switches,
# image2template_feature, verification, and the TPR@FPR table of its step 5.

def ref_tar_at_far(tid_mid_file, pts_file, pair_file, img_feats, use_flip_test,
                   use_norm_score, use_detector_score):
  from sklearn import preprocessing
  from sklearn.metrics import roc_curve
  meta = np.loadtxt(tid_mid_file, dtype=str, ndmin=2)
  templates, medias = meta[:, 1].astype(int), meta[:, 2].astype(int)
  pairs = np.loadtxt(pair_file, dtype=str, ndmin=2)
  p1, p2, label = pairs[:, 0].astype(int), pairs[:, 1].astype(int), pairs[:, 2].astype(int)
  with open(pts_file) as f:
    faceness_scores = np.array([l.strip().split(" ")[-1] for l in f]).astype(np.float32)
  img_feats = np.asarray(img_feats, np.float32)
  if use_flip_test:
    x = img_feats[:, 0:img_feats.shape[1] // 2] + img_feats[:, img_feats.shape[1] // 2:]
  else:
    x = img_feats[:, 0:img_feats.shape[1] // 2]
  if not use_norm_score:
    x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
  if use_detector_score:
    x = x * faceness_scores[:, np.newaxis]
  unique_templates = np.unique(templates)
  template_feats = np.zeros((len(unique_templates), x.shape[1]))
  for c, uqt in enumerate(unique_templates):
    (ind_t,) = np.where(templates == uqt)
    face_norm_feats, face_medias = x[ind_t], medias[ind_t]
    unique_medias, counts = np.unique(face_medias, return_counts=True)
    media_norm_feats = []
    for u, ct in zip(unique_medias, counts):
      (ind_m,) = np.where(face_medias == u)
      if ct == 1:
        media_norm_feats += [face_norm_feats[ind_m]]
      else:
        media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
    template_feats[c] = np.sum(np.array(media_norm_feats), axis=0)
  template_norm_feats = preprocessing.normalize(template_feats)
  template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
  for c, uqt in enumerate(unique_templates):
    template2id[uqt] = c
  score = np.zeros((len(p1),))
  total = np.array(range(len(p1)))
  for s in [total[i:i + 100000] for i in range(0, len(p1), 100000)]:
    feat1 = template_norm_feats[template2id[p1[s]]]
    feat2 = template_norm_feats[template2id[p2[s]]]
    score[s] = np.sum(feat1 * feat2, -1).flatten()
  fpr, tpr, _ = roc_curve(label, score)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  out = {}
  for x_label in FARS:
    _, min_index = min(list(zip(abs(fpr - x_label), range(len(fpr)))))
    out[ijb_eval.far_key(x_label)] = float(tpr[min_index])
  return out


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("ijb_release")
  return fixtures.write_ijb_release(str(root), "ijbc")


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("ijb_data"))
  ijb.prepare("ijbc", os.path.dirname(release["root"]), data_dir)
  return data_dir


def _meta(release, what):
  return os.path.join(release["root"], "meta", f"ijbc_{what}.txt")


def _projection_embed(crops):
  """A fixed linear 'network' on the crops: flip-concat (N, 2 * 16) float32."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=(112 * 112 * 3, 16)).astype(np.float32) / 300
  f = lambda x: (x.reshape(len(x), -1).astype(np.float32) / 255 - 0.5) @ w  # noqa: E731
  return np.concatenate([f(crops), f(crops[:, :, ::-1])], -1)


# ---------------------------------------------------------------------------- builder

def test_ijbc_round_trip_aligned_crops_and_meta(release, prepared):
  src = ijb.data_source("ijbc", prepared)
  n = len(release["names"])
  assert len(src) == n
  for i in range(n):
    r = src[i]
    assert (int(r["template"]), int(r["media"]), int(r["index"])) == (
        release["templates"][i], release["medias"][i], i)
    assert r["source"] == release["names"][i].encode()
    assert r["score"] == np.float32(release["scores"][i])
    np.testing.assert_allclose(r["landmarks"], release["landmarks"][i], atol=1e-4)
    crop = faces.decode_image(r["image"], None)
    photo = align.read_photo(os.path.join(release["root"], "loose_crop", release["names"][i]))
    np.testing.assert_array_equal(crop, align.align_face(photo, r["landmarks"]))
    # the photo's face comes back into the template placement (two resamplings + JPEG)
    err = np.abs(crop[20:92, 20:92].astype(int) - release["faces"][i][20:92, 20:92]).mean()
    assert err < 6, (i, err)
  t1, t2, lab = ijb.template_pairs("ijbc", prepared)
  np.testing.assert_array_equal(np.stack([t1, t2, lab], 1), release["pairs"])
  meta = ijb.image_meta("ijbc", prepared)
  np.testing.assert_array_equal(meta["template"], release["templates"])
  np.testing.assert_array_equal(meta["media"], release["medias"])
  md = ijb.builder("ijbc", prepared).info.metadata
  assert (md["num_images"], md["num_templates"], md["num_pairs"], md["num_genuine"]) == (
      18, 6, 15, 3)


def _break(release_root, case):
  meta = os.path.join(release_root, "meta")
  if case == "missing_meta":
    os.remove(os.path.join(meta, "ijbc_template_pair_label.txt"))
    return "meta/ijbc_template_pair_label.txt: missing"
  if case == "short_landmark_line":
    path = os.path.join(meta, "ijbc_name_5pts_score.txt")
    lines = open(path).read().splitlines()
    lines[3] = " ".join(lines[3].split()[:-2])
    open(path, "w").write("\n".join(lines) + "\n")
    return "ijbc_name_5pts_score.txt line 4: 9 values after the name '4.jpg'"
  os.remove(os.path.join(release_root, "loose_crop", "5.jpg"))
  return "ijbc_face_tid_mid.txt line 5: image"


@pytest.mark.parametrize("case", ["missing_meta", "short_landmark_line", "missing_image"])
def test_bad_release_one_line_nothing_prepared(tmp_path, case):
  rel = fixtures.write_ijb_release(str(tmp_path / "rel"), "ijbc", seed=1)
  want = _break(rel["root"], case)
  data_dir = str(tmp_path / "data")
  with pytest.raises((ValueError, OSError)) as e:
    ijb.prepare("ijbc", str(tmp_path / "rel"), data_dir)
  assert "\n" not in str(e.value) and want in str(e.value), str(e.value)
  assert not ijb.builder("ijbc", data_dir).is_prepared()
  with pytest.raises(FileNotFoundError):
    ijb.data_source("ijbc", data_dir)


def test_prepare_cli_bad_landmark_line_exit_1(tmp_path):
  rel = fixtures.write_ijb_release(str(tmp_path / "rel"), "ijbc", seed=2)
  want = _break(rel["root"], "short_landmark_line")
  data_dir = tmp_path / "data"
  p = subprocess.run([sys.executable, "-m", "askd_jax.data.prepare", "--dataset=ijbc",
                      f"--manual_dir={tmp_path / 'rel'}", f"--data_dir={data_dir}"],
                     capture_output=True, text=True, env=cli_env(), timeout=300)
  assert p.returncode == 1, p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("prepare --dataset=ijbc: ") and want in last, p.stderr
  assert not ijb.builder("ijbc", str(data_dir)).is_prepared()


# --------------------------------------------------------------------------- protocol

@pytest.mark.parametrize("flip,norm,det", SWITCHES)
def test_tar_at_far_equals_insightface_on_the_prepared_fixture(release, prepared, flip, norm,
                                                               det):
  """Crops read back from the prepared set, a linear 'network', every switch combination:
  ijb_eval.evaluate equals the ijb_11.py transcription exactly."""
  src = ijb.data_source("ijbc", prepared)
  crops = np.stack([faces.decode_image(src[i]["image"], None) for i in range(len(src))])
  emb = _projection_embed(crops)
  meta = ijb.image_meta("ijbc", prepared)
  t1, t2, lab = ijb.template_pairs("ijbc", prepared)
  got = ijb_eval.evaluate(emb, meta["template"], meta["media"], meta["score"], t1, t2, lab,
                          use_flip_test=flip, use_norm_score=norm, use_detector_score=det)
  want = ref_tar_at_far(_meta(release, "face_tid_mid"), _meta(release, "name_5pts_score"),
                        _meta(release, "template_pair_label"), emb, flip, norm, det)
  assert got == want
  assert list(got) == [ijb_eval.far_key(f) for f in FARS]


def _synthetic_set(tmp_path, n_img=3000, n_tmpl=300, n_pairs=40000, seed=0):
  """Meta files in the release formats + flip-concat embeddings of a larger random set."""
  rng = np.random.default_rng(seed)
  subject = rng.integers(0, 60, n_tmpl)
  tmpl = np.sort(rng.choice(np.arange(1, 10 * n_tmpl), n_tmpl, replace=False))
  img_t = np.concatenate([np.arange(n_tmpl), rng.integers(0, n_tmpl, n_img - n_tmpl)])
  rng.shuffle(img_t)
  media = rng.integers(0, 4, n_img) + 10 * img_t  # media shared inside a template
  centre = rng.normal(size=(60, 32)).astype(np.float32)
  emb = (centre[subject[img_t]][:, None, :] + rng.normal(0, 5.0, (n_img, 2, 32))).reshape(
      n_img, 64).astype(np.float32)
  emb *= rng.uniform(0.5, 2, (n_img, 1)).astype(np.float32)
  score = np.round(rng.uniform(0.2, 1, n_img), 4)
  a = rng.integers(0, n_tmpl, n_pairs)
  b = (a + rng.integers(1, n_tmpl, n_pairs)) % n_tmpl  # never a template with itself
  lab = (subject[a] == subject[b]).astype(int)
  files = {w: str(tmp_path / f"{w}.txt") for w in ("tid_mid", "pts", "pairs")}
  with open(files["tid_mid"], "w") as f:
    f.writelines(f"{i}.jpg {tmpl[t]} {m}\n" for i, (t, m) in enumerate(zip(img_t, media)))
  with open(files["pts"], "w") as f:
    f.writelines(f"{i}.jpg" + " 1" * 10 + f" {s}\n" for i, s in enumerate(score))
  with open(files["pairs"], "w") as f:
    f.writelines(f"{tmpl[x]} {tmpl[y]} {l}\n" for x, y, l in zip(a, b, lab))
  return files, emb, tmpl[img_t], media, score.astype(np.float32), tmpl[a], tmpl[b], lab


@pytest.mark.parametrize("flip,norm,det", [(True, True, True), (False, False, False)])
def test_tar_at_far_equals_insightface_on_40k_pairs_streamed(tmp_path, flip, norm, det):
  """3,000 images, 300 templates, 40,000 pairs (FARs down to 1e-4 resolved); the images
  added in batches of 97 (the streaming path) give the same numbers as the reference."""
  files, emb, tmpl, media, score, t1, t2, lab = _synthetic_set(tmp_path)
  acc = ijb_eval.TemplateFeatures(tmpl, media, use_flip_test=flip, use_norm_score=norm,
                                  use_detector_score=det)
  for s in range(0, len(emb), 97):
    acc.add(np.arange(s, min(s + 97, len(emb))), emb[s:s + 97], score[s:s + 97])
  got = ijb_eval.evaluate_templates(acc, t1, t2, lab)
  want = ref_tar_at_far(files["tid_mid"], files["pts"], files["pairs"], emb, flip, norm, det)
  assert got == want
  assert len(set(got.values())) > 3  # the FARs pick different points


def test_roc_curve_equals_sklearn_with_ties():
  from sklearn.metrics import roc_curve
  rng = np.random.default_rng(0)
  for trial in range(5):
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.normal(size=5000) + y, 1 + trial % 3)  # many tied scores
    for got, want in zip(ijb_eval.roc_curve(y, s), roc_curve(y, s)):
      np.testing.assert_array_equal(got, want)


def test_streaming_input_checked():
  acc = ijb_eval.TemplateFeatures([1, 1, 2], [5, 5, 6])
  emb, sc = np.ones((3, 4), np.float32), np.ones(3, np.float32)
  acc.add([0, 1], emb[:2], sc[:2])
  with pytest.raises(ValueError, match="ascending row order"):
    acc.add([1], emb[:1], sc[:1])
  with pytest.raises(ValueError, match="1 of 3 images were never added"):
    acc.result()
  with pytest.raises(ValueError, match="template 9 has no image"):
    ijb_eval.pair_scores(np.array([1, 2]), np.eye(2), [1, 9], [2, 2])
  with pytest.raises(ValueError, match="needs the detector scores"):
    ijb_eval.image_features(emb)
