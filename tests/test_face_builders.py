"""tfds face builders on fixture files written here in the real formats."""
from __future__ import annotations

import io
import os
import pickle

import grain.python as grain
import numpy as np
import pytest
from PIL import Image

from askd_jax.data import faces, fixtures, recordio


_encode, _pixels = fixtures.encode_image, fixtures.random_pixels


def _decoded(record, key="image", size=112):
  return faces.DecodeImages((key,), size).map(record)[key]


def _one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


@pytest.fixture
def rec_set(tmp_path):
  """train.rec/.idx: 5 PNGs, one JPEG, one corrupt JPEG (record key 7)."""
  pix = _pixels(7, 0)
  yy, xx = np.mgrid[0:112, 0:112]
  pix[5] = np.stack([yy * 2, xx * 2, (yy + xx)], -1).astype(np.uint8)  # smooth: JPEG-friendly
  labels = [2, 0, 1, 1, 0, 2, 1]
  blobs = [_encode(p) for p in pix[:5]] + [_encode(pix[5], "JPEG")]
  blobs.append(_encode(pix[6], "JPEG")[:200])  # truncated JPEG: does not decode
  manual = tmp_path / "faces_webface_112x112"
  manual.mkdir()
  recordio.write_insightface_rec(str(manual / "train.rec"), str(manual / "train.idx"),
                                 list(zip(blobs, labels)))
  return manual, pix, labels


def test_insightface_rec_round_trip_skips_corrupt(rec_set, tmp_path):
  manual, pix, labels = rec_set
  b = faces.prepare("casia", str(manual), str(tmp_path / "data"), on_corrupt="skip")
  assert b.info.metadata["skipped_corrupt"] == {"train": 1}
  assert b.info.metadata["skipped_sources"] == [f"{manual}/train.rec record 7"]
  assert b.info.metadata["num_classes"] == 3
  src = faces.data_source("casia", "train", str(tmp_path / "data"))
  assert len(src) == 6
  for i in range(6):
    r = src[i]
    assert r["label"] == labels[i] and r["source"] == f"train.rec#{i + 1}".encode()
    img = _decoded(r)
    assert img.dtype == np.uint8 and img.shape == (112, 112, 3)
    if i < 5:
      np.testing.assert_array_equal(img, pix[i])
    else:  # the JPEG: lossy, but close and byte-identical to a direct decode
      np.testing.assert_array_equal(img, np.asarray(Image.open(io.BytesIO(r["image"]))))
      assert np.abs(img.astype(int) - pix[i]).mean() < 3


def test_insightface_rec_corrupt_refused(rec_set, tmp_path):
  manual, _, _ = rec_set
  with pytest.raises(faces.CorruptImageError) as e:
    faces.prepare("casia", str(manual), str(tmp_path / "data"), on_corrupt="error")
  msg = _one_line(e)
  assert f"{manual}/train.rec record 7" in msg and "does not decode" in msg


def test_decode_transform_skip_or_error_in_grain_loader(rec_set, tmp_path):
  manual, pix, labels = rec_set
  faces.prepare("casia", str(manual), str(tmp_path / "data"), on_corrupt="keep")
  src = faces.data_source("casia", "train", str(tmp_path / "data"))
  assert len(src) == 7

  def loader(on_corrupt):
    ops = faces.decode_transforms(size=56, on_corrupt=on_corrupt)
    ops = [pickle.loads(pickle.dumps(op)) for op in ops]  # must reach worker processes
    sampler = grain.IndexSampler(len(src), shard_options=grain.NoSharding(), shuffle=False,
                                 num_epochs=1, seed=0)
    return grain.DataLoader(data_source=src, sampler=sampler, worker_count=0,
                            operations=ops + [grain.Batch(3, drop_remainder=False)])

  batches = list(loader("skip"))
  assert [b["image"].shape for b in batches] == [(3, 56, 56, 3), (3, 56, 56, 3)]
  assert set(batches[0]) == {"image", "label"}
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[:6])
  np.testing.assert_array_equal(
      batches[0]["image"][0], np.asarray(Image.fromarray(pix[0]).resize((56, 56), Image.BILINEAR)))
  with pytest.raises(Exception) as e:
    list(loader("error"))
  assert "train.rec#7[image]" in str(e.value) and "does not decode" in str(e.value)


def test_train_loader_skips_corrupt_mid_epoch(rec_set, tmp_path):
  pipeline = pytest.importorskip("askd_jax.data.pipeline", reason="pipeline not present")
  manual, _, labels = rec_set
  with pytest.raises(FileNotFoundError) as e:
    faces.data_source("casia", "train", str(tmp_path / "data"))
  assert "not prepared" in _one_line(e)
  faces.prepare("casia", str(manual), str(tmp_path / "data"), on_corrupt="keep")
  src = faces.data_source("casia", "train", str(tmp_path / "data"))
  loader = pipeline.make_train_loader(
      src, global_batch_size=2, seed=3, num_epochs=2, shard_options=grain.NoSharding(),
      transforms=faces.decode_transforms(size=32, on_corrupt="skip"))
  batches = list(loader)  # 2 epochs of the 6 good records, 2 per batch
  assert len(batches) == 6
  assert all(b["image"].shape == (2, 32, 32, 3) and b["image"].dtype == np.uint8 for b in batches)
  seen = np.concatenate([b["label"] for b in batches])
  assert sorted(seen.tolist()) == sorted(labels[:6] * 2)


_write_bin = fixtures.write_verification_bin


def test_verification_bin_round_trip_folds_in_file_order(tmp_path):
  n_pairs = 23  # 10 folds of sizes 3,3,3,2,...: folds contiguous in file order
  pix = _pixels(2 * n_pairs, 1, size=16)
  issame = [bool(i % 3 == 0) for i in range(n_pairs)]
  manual = tmp_path / "m"
  manual.mkdir()
  _write_bin(manual / "agedb_30.bin", pix, issame)
  b = faces.prepare("agedb_30", str(manual), str(tmp_path / "data"))
  assert b.info.metadata["num_pairs"] == n_pairs
  src = faces.data_source("agedb_30", "test", str(tmp_path / "data"))
  recs = [src[i] for i in range(len(src))]
  assert [r["index"] for r in recs] == list(range(n_pairs))
  assert [r["is_same"] for r in recs] == issame
  assert [r["fold"] for r in recs] == [0] * 3 + [1] * 3 + [2] * 3 + sum(([f] * 2 for f in range(3, 10)), [])
  for i, r in enumerate(recs):
    pair = faces.DecodeImages(("image1", "image2"), None).map(r)
    np.testing.assert_array_equal(pair["image1"], pix[2 * i])
    np.testing.assert_array_equal(pair["image2"], pix[2 * i + 1])
  # 6,000 pairs: fold = index // 600, as the official AgeDB list
  np.testing.assert_array_equal(faces.verification_folds(6000), np.arange(6000) // 600)
  np.testing.assert_array_equal(faces.verification_folds(7000), np.arange(7000) // 700)


def test_a_split_beyond_the_in_memory_buffer_is_prepared_without_tensorflow(tmp_path,
                                                                          monkeypatch):
  """tfds keeps a split's records in memory up to 1 GB, then spills them to temporary files
  through tf.io.gfile; askd_jax installs no TensorFlow, so preparing a larger split (the real
  IJB-C, CASIA-WebFace) stopped with "No module named 'tensorflow'". With the buffer shrunk
  to 1 kB, a 23-pair .bin spills and is prepared through `prepared._LocalFiles` with the
  same records as in memory. Checked by hand: without `_spill_to_local_files` in
  `prepared.write_array_record` this test fails with that ModuleNotFoundError."""
  pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core import shuffle
  pix = _pixels(46, 1, size=16)
  issame = [bool(i % 3 == 0) for i in range(23)]
  manual = tmp_path / "m"
  manual.mkdir()
  _write_bin(manual / "agedb_30.bin", pix, issame)
  faces.prepare("agedb_30", str(manual), str(tmp_path / "in_memory"))
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
  faces.prepare("agedb_30", str(manual), str(tmp_path / "spilled"))
  a, b = (faces.data_source("agedb_30", "test", str(tmp_path / d)) for d in ("in_memory",
                                                                          "spilled"))
  assert len(a) == len(b) == 23
  for i in range(23):
    ra, rb = a[i], b[i]
    assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra), i
  assert not list((tmp_path / "spilled").rglob("bucket_*.tmp"))  # temporary files removed


def test_verification_bin_numpy_bools_and_jpeg(tmp_path):
  pix = _pixels(4, 2, size=16)
  path = tmp_path / "lfw.bin"
  with open(path, "wb") as f:
    pickle.dump(([_encode(p, "JPEG") for p in pix], np.array([True, False])), f, protocol=2)
  images, flags = faces.read_verification_bin(str(path))
  assert flags.tolist() == [True, False] and len(images) == 4
  assert faces.decode_image(images[3]).shape == (16, 16, 3)


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):  # would create the marker file if ever executed
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_verification_bin_never_executes_pickle(tmp_path, protocol):
  marker = tmp_path / "executed"
  path = tmp_path / "lfw.bin"
  with open(path, "wb") as f:
    pickle.dump(([_encode(_pixels(1, 0, 8)[0]), _Payload(str(marker))], [True]), f,
                protocol=protocol)
  with pytest.raises(ValueError) as e:
    faces.read_verification_bin(str(path))
  msg = _one_line(e)
  assert str(path) in msg and "refused" in msg
  assert not marker.exists()
  # the builder takes the same path
  with pytest.raises(ValueError):
    faces.prepare("lfw", str(tmp_path), str(tmp_path / "data"))
  assert not marker.exists()


@pytest.mark.parametrize("obj,why", [
    ({"images": []}, "pickled pair"),
    (([b"a", b"b"], np.array([1, 0])), "refused numpy dtype"),
    (([b"a", "str"], [True]), "image bytes"),
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
])
def test_verification_bin_other_types_refused(tmp_path, obj, why):
  path = tmp_path / "cfp_fp.bin"
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  with pytest.raises(ValueError) as e:
    faces.read_verification_bin(str(path))
  msg = _one_line(e)
  assert str(path) in msg and why in msg


def _tinyface_tree(root, pix):
  return fixtures.write_tinyface_tree(str(root), pix)


def test_tinyface_round_trip(tmp_path):
  pix = _pixels(9, 3, size=24)
  files = _tinyface_tree(tmp_path / "tf", pix)
  faces.prepare("tinyface", str(tmp_path / "tf"), str(tmp_path / "data"))
  probe = faces.data_source("tinyface", "probe", str(tmp_path / "data"))
  gallery = faces.data_source("tinyface", "gallery", str(tmp_path / "data"))
  probes = [probe[i] for i in range(len(probe))]
  gal = [gallery[i] for i in range(len(gallery))]
  assert sorted((r["source"].decode(), r["label"]) for r in probes) == sorted(
      [(f"aligned_pad_0.1_pad_high/Probe/{n}", int(n.split("_")[0]))
       for n in ["1_0.png", "2_0.png", "10_0.png"]])
  # gallery = match (labels from names) then distractors (-100)
  assert [r["label"] for r in gal[:4]] and sorted(r["label"] for r in gal[:4]) == [1, 2, 10, 10]
  assert [r["label"] for r in gal[4:]] == [-100, -100]
  assert {r["source"].decode() for r in gal[4:]} == {
      "aligned_pad_0.1_pad_high/Gallery_Distractor/x_0.png",
      "aligned_pad_0.1_pad_high/Gallery_Distractor/sub/y.png"}
  for r in probes + gal:
    np.testing.assert_array_equal(_decoded(r, size=None), files[r["source"].decode()])
    assert _decoded(r, size=112).shape == (112, 112, 3)


def test_tinyface_missing_gallery_match(tmp_path):
  _tinyface_tree(tmp_path / "tf", _pixels(9, 3, size=8))
  os.rename(tmp_path / "tf/aligned_pad_0.1_pad_high/Gallery_Match", tmp_path / "tf/gm")
  with pytest.raises(FileNotFoundError) as e:
    faces.prepare("tinyface", str(tmp_path / "tf"), str(tmp_path / "data"))
  msg = _one_line(e)
  assert "aligned_pad_0.1_pad_high/Gallery_Match" in msg and "missing" in msg


def test_image_list_round_trip(tmp_path):
  pix = _pixels(4, 4, size=20)
  root = tmp_path / "webface"
  lines = []
  for i, p in enumerate(pix):
    rel = f"image/{i // 2:06d}/{i:08d}.png"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(_encode(p))
    # as the official script writes it: an absolute path from the machine that made it
    lines.append(f"/data/sung/dataset/Face/faces_webface_112x112/{rel}  {i // 2}")
  (root / "train.list").write_text("\n".join(lines) + "\n")
  b = faces.prepare("list", str(root), str(tmp_path / "data"))
  assert b.info.metadata["num_classes"] == 2
  src = faces.data_source("list", "train", str(tmp_path / "data"))
  assert [src[i]["label"] for i in range(4)] == [0, 0, 1, 1]
  for i in range(4):
    np.testing.assert_array_equal(_decoded(src[i], size=None), pix[i])
  (root / "bad.list").write_text("image/000000/00000000.png  0\nimage/nope.png  1\n")
  with pytest.raises(FileNotFoundError) as e:
    faces.read_image_list(str(root / "bad.list"), str(root))
  assert "bad.list line 2" in _one_line(e)


# ------------------------------------------------------------------- JPEG round trip

def _opencv_round_trip(rgb, tmp_path):
  """What the official utility/load_images_from_bin.py + loaders do: cv2.imwrite(path.jpg) of
  the BGR image (OpenCV's default quality 95), cv2.imread back; returned as RGB."""
  import cv2
  path = str(tmp_path / "x.jpg")
  assert cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1]))
  return cv2.imread(path)[..., ::-1]


def test_reencode_jpeg_matches_opencv_imwrite_imread(tmp_path):
  """faces.reencode_jpeg (Pillow) against OpenCV itself on noise, gradients, face-like
  images, a near-grey one and odd sizes (chroma subsampling at the edges): at most 1 grey
  level on at most 0.1 % of the pixels (measured: equal, docs/protocol.md)."""
  rng = np.random.default_rng(0)
  imgs = _pixels(4, 5) + [fixtures.identity_pixels(k, 1) for k in range(4)]
  imgs += [fixtures.gradient_pixels(rng, 112, 112), fixtures.gradient_pixels(rng, 23, 37),
           (128 + rng.integers(-3, 4, (112, 112, 3))).astype(np.uint8),
           rng.integers(0, 256, (17, 9, 3), dtype=np.uint8)]
  differ = total = 0
  for img in imgs:
    got, want = faces.reencode_jpeg(img), _opencv_round_trip(img, tmp_path)
    assert got.shape == want.shape == img.shape and got.dtype == np.uint8
    d = np.abs(got.astype(int) - want.astype(int))
    assert d.max() <= 1
    differ, total = differ + int((d > 0).sum()), total + d.size
    assert np.abs(got.astype(int) - img.astype(int)).max() > 0  # it is lossy: a real re-encode
  assert differ <= 1e-3 * total, (differ, total)


def test_jpeg_roundtrip_option_in_the_paper_presets(rec_set, tmp_path):
  """`data.jpeg_roundtrip` is on in the casia and tinyface presets (absent from the demo:
  its config hash is unchanged) and re-encodes the CASIA training images and the .bin
  verification images as OpenCV's imwrite + imread, never TinyFace's own files; off, the
  stored pixels come through. Fails without the option (before issue 32 item 1: the
  preset had no such field and the images came through untouched)."""
  from askd_jax import experiment
  from askd_jax.tasks import facerec
  manual, pix, _ = rec_set
  data = tmp_path / "data"
  faces.prepare("casia", str(manual), str(data), on_corrupt="skip")
  vpix = _pixels(40, 2)
  fixtures.write_verification_bin(str(manual / "lfw.bin"), vpix, [i % 2 == 0 for i in range(20)])
  faces.prepare("lfw", str(manual), str(data))
  tpix = _pixels(9, 3)
  files = _tinyface_tree(tmp_path / "tf", tpix)
  faces.prepare("tinyface", str(tmp_path / "tf"), str(data))
  cfg_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "facerec.py")
  assert "jpeg_roundtrip" not in experiment.load_config(cfg_path, []).data

  def load(preset, *flags):
    cfg = experiment.load_config(f"{cfg_path}:{preset}", [f"--config.data.data_dir={data}",
                                                          "--config.data.verification=lfw",
                                                          *flags])
    return cfg, facerec.load_face_data(cfg.data)

  for on in (True, False):
    cfg, d = load("casia", *([] if on else ["--config.data.jpeg_roundtrip=false"]))
    assert cfg.data.jpeg_roundtrip is on
    fix = (lambda x: _opencv_round_trip(x, tmp_path)) if on else (lambda x: x)
    for i in range(5):  # the PNG records, through the training loader's decode operations
      r = d["train"][i]
      for op in d["train_transforms"]:
        r = op.map(r) if isinstance(op, grain.MapTransform) else r
      np.testing.assert_array_equal(r["image"], fix(pix[i]))
    ver = d["verification"][0]["images"]
    for k in range(0, 40, 7):
      np.testing.assert_array_equal(ver[k], fix(vpix[k]))
  cfg, d = load("tinyface", "--config.data.tinyface=true")
  assert cfg.data.jpeg_roundtrip is True and len(d["verification"]) == 1
  tf = d["tinyface"]
  want = {n: files[n] for n in files}
  from askd_jax.data import eval_stream
  for sp in ("probe", "gallery"):  # streamed in the prepared order: its file names say which
    src = eval_stream.columns(faces.data_source("tinyface", sp, str(data)), ("source",))["source"]
    assert len(src) == len(tf[sp]["image"])
    for img, name in zip(tf[sp]["image"][list(range(len(src)))], src):
      np.testing.assert_array_equal(img, want[name.decode()])  # TinyFace: its own pixels
