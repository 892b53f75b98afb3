"""WIDER FACE builder on fixture files written in the released layout."""
from __future__ import annotations

import os

import numpy as np
import pytest

scipy_io = pytest.importorskip("scipy.io")

from askd_jax.data import fixtures as FX  # noqa: E402
from askd_jax.data import widerface as WD  # noqa: E402
from askd_jax.evaluate import widerface as WE  # noqa: E402

# event -> image -> list of 'x y w h blur expression illumination invalid occlusion pose'.
TRAIN = {
    "0--Parade": {
        "0_Parade_a": [[10, 12, 20, 24, 0, 0, 0, 0, 0, 0],
                       [40, 5, 8, 9, 2, 0, 1, 1, 2, 0],   # invalid
                       [3, 3, 0, 7, 0, 0, 0, 0, 0, 0]],   # zero width
        "0_Parade_empty": [],                              # 0 faces: count 0 + a zero line
    },
}
VAL = {
    "0--Parade": {
        "0_Parade_v1": [[1, 2, 30, 30, 0, 0, 0, 0, 0, 0],
                        [50, 40, 6, 7, 2, 0, 0, 0, 1, 0],
                        [20, 50, 12, 10, 1, 0, 0, 1, 0, 0]],
        "0_Parade_v2": [[5, 5, 25, 20, 0, 0, 0, 0, 0, 0]],
    },
    "1--Handshaking": {
        "1_Handshaking_v3": [[0, 0, 16, 16, 0, 0, 0, 0, 0, 0],
                             [30, 30, 4, 4, 2, 0, 0, 0, 2, 0]],
    },
}
# 1-based keep lists per image, in the .mat order (events, then files).
KEEP = {
    "easy": {"0_Parade_v1": [1], "0_Parade_v2": [1], "1_Handshaking_v3": [1]},
    "medium": {"0_Parade_v1": [1, 2], "0_Parade_v2": [1], "1_Handshaking_v3": [1]},
    "hard": {"0_Parade_v1": [1, 2], "0_Parade_v2": [1], "1_Handshaking_v3": [1, 2]},
}
SIZES = {"0_Parade_a": (64, 48), "0_Parade_empty": (32, 40), "0_Parade_v1": (80, 60),
         "0_Parade_v2": (50, 50), "1_Handshaking_v3": (40, 30)}  # (width, height)


def _txt(split):
  return FX.widerface_txt(split)


def _release_files():
  return FX.widerface_release_files(TRAIN, VAL, KEEP, SIZES)


_write_tree, _write_zips = FX.write_tree, FX.write_zips


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("wider")
  _write_tree(str(root / "manual"), _release_files())
  builder = WD.prepare(root / "manual", root / "data")
  return root, builder


def _records(builder, split):
  ds = builder.as_data_source(split)
  recs = [ds[i] for i in range(len(ds))]
  return {r["image/filename"].decode(): r for r in recs}


def test_train_split_boxes_and_flags(built):
  _, builder = built
  recs = _records(builder, "train")
  assert set(recs) == {"0--Parade/0_Parade_a.jpg", "0--Parade/0_Parade_empty.jpg"}
  a = recs["0--Parade/0_Parade_a.jpg"]
  faces = np.array(TRAIN["0--Parade"]["0_Parade_a"])
  np.testing.assert_array_equal(a["faces/bbox"], faces[:, :4].astype(np.float32))
  np.testing.assert_array_equal(a["faces/attributes"], faces[:, 4:])
  np.testing.assert_array_equal(a["faces/invalid"], [False, True, False])
  np.testing.assert_array_equal(a["faces/valid"], [True, False, False])
  np.testing.assert_array_equal(a["faces/keep_hard"], [False] * 3)
  img = WD.decode_image(a["image"])
  assert img.shape == (48, 64, 3) and img.dtype == np.uint8
  assert (a["image/width"], a["image/height"]) == (64, 48)
  empty = recs["0--Parade/0_Parade_empty.jpg"]
  assert empty["faces/bbox"].shape == (0, 4) and empty["faces/valid"].shape == (0,)
  assert sorted(int(r["image/id"]) for r in recs.values()) == [0, 1]


def test_validation_split_keep_masks(built):
  _, builder = built
  recs = _records(builder, "validation")
  assert len(recs) == 3
  for ev, imgs in VAL.items():
    for name, faces in imgs.items():
      r = recs[f"{ev}/{name}.jpg"]
      np.testing.assert_array_equal(r["faces/bbox"], np.array(faces, np.float32)[:, :4])
      for d in WE.DIFFICULTIES:
        mask = np.zeros(len(faces), bool)
        mask[np.array(KEEP[d][name]) - 1] = True
        np.testing.assert_array_equal(r[f"faces/keep_{d}"], mask, err_msg=f"{name} {d}")
  v1 = recs["0--Parade/0_Parade_v1.jpg"]
  np.testing.assert_array_equal(v1["faces/invalid"], [False, False, True])


def test_load_widerface_gt_and_gt_from_example_agree(built):
  root, builder = built
  gts = WD.load_widerface_gt(root / "manual", split="val")
  assert [g.name for g in gts] == ["0--Parade/0_Parade_v1", "0--Parade/0_Parade_v2",
                                   "1--Handshaking/1_Handshaking_v3"]
  g1 = gts[0]
  np.testing.assert_array_equal(g1.boxes, [[1, 2, 30, 30], [50, 40, 6, 7], [20, 50, 12, 10]])
  np.testing.assert_array_equal(g1.keep["easy"], [0])
  np.testing.assert_array_equal(g1.keep["medium"], [0, 1])
  np.testing.assert_array_equal(gts[2].keep["hard"], [0, 1])
  recs = _records(builder, "validation")
  for g in gts:
    e = WD.gt_from_example(recs[g.name + ".jpg"])
    assert e.name == g.name
    np.testing.assert_array_equal(e.boxes, g.boxes)
    for d in WE.DIFFICULTIES:
      np.testing.assert_array_equal(e.keep[d], g.keep[d])
  # Perfect detections of every box -> AP 1 for each difficulty.
  preds = {g.name: np.concatenate([g.boxes[:, :2], g.boxes[:, :2] + g.boxes[:, 2:],
                                   np.linspace(1, 0.5, len(g.boxes))[:, None]], 1) for g in gts}
  ap = WE.evaluate_widerface(preds, gts)
  for d in WE.DIFFICULTIES:
    assert ap[d] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="only for the val split"):
    WD.load_widerface_gt(root / "manual", split="train")


def test_zip_release_reads_the_same(built, tmp_path):
  _, builder = built
  _write_zips(str(tmp_path / "manual"), _release_files())
  assert not os.path.isdir(tmp_path / "manual" / "WIDER_val")
  zb = WD.prepare(tmp_path / "manual", tmp_path / "data")
  a, b = _records(builder, "validation"), _records(zb, "validation")
  assert set(a) == set(b)
  for k in a:
    for f in a[k]:
      np.testing.assert_array_equal(a[k][f], b[k][f], err_msg=f"{k} {f}")


def test_malformed_txt_errors_name_file_and_line():
  good = _txt(TRAIN).splitlines()
  bad = good.copy()
  bad[1] = "three"
  with pytest.raises(ValueError, match=r"^gt\.txt:2: expected the face count") as e:
    WD.parse_bbx_gt("\n".join(bad), "gt.txt")
  assert "\n" not in str(e.value)
  bad = good.copy()
  bad[3] = "40 5 8"
  with pytest.raises(ValueError, match=r"^gt\.txt:4: expected 10 numbers"):
    WD.parse_bbx_gt("\n".join(bad), "gt.txt")
  with pytest.raises(ValueError, match=r"^gt\.txt:4: file ends after 1 of 3 faces"):
    WD.parse_bbx_gt("\n".join(good[:3]), "gt.txt")
  with pytest.raises(ValueError, match=r"^gt\.txt:1: expected an image path"):
    WD.parse_bbx_gt("\n".join(good[1:]), "gt.txt")
  recs = WD.parse_bbx_gt("\n".join(good), "gt.txt")
  assert [r.lineno for r in recs] == [1, 6] and recs[1].boxes.shape == (0, 4)


def test_missing_image_error_names_txt_line(tmp_path):
  files = _release_files()
  del files["WIDER_train/images/0--Parade/0_Parade_empty.jpg"]
  del files["WIDER_val/images/0--Parade/0_Parade_v1.jpg"]  # val split fails the same way
  _write_tree(str(tmp_path / "manual"), files)
  with pytest.raises(FileNotFoundError) as e:
    WD.prepare(tmp_path / "manual", tmp_path / "data")
  msg = str(e.value)
  assert "\n" not in msg and "_bbx_gt.txt:" in msg and "not found" in msg
  assert ("wider_face_train_bbx_gt.txt:6: image '0--Parade/0_Parade_empty.jpg'" in msg
          or "wider_face_val_bbx_gt.txt:1: image '0--Parade/0_Parade_v1.jpg'" in msg)


def test_malformed_count_through_builder(tmp_path):
  files = _release_files()
  lines = _txt(TRAIN).splitlines()
  lines[6] = "zero"  # the count of 0_Parade_empty.jpg, line 7
  files["wider_face_split/wider_face_train_bbx_gt.txt"] = ("\n".join(lines) + "\n").encode()
  del files["wider_face_split/wider_face_val_bbx_gt.txt"]
  for rel in [r for r in files if r.startswith("WIDER_val/")]:
    del files[rel]
  _write_tree(str(tmp_path / "manual"), files)
  with pytest.raises(ValueError) as e:
    WD.prepare(tmp_path / "manual", tmp_path / "data")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(os.path.join(str(tmp_path / "manual"), "wider_face_split",
                                     "wider_face_train_bbx_gt.txt") + ":7: expected the face count")
