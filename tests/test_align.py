"""5-point alignment (askd_jax.data.align, python -m askd_jax.tools.align) on synthetic faces."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from askd_jax.data import align
from askd_jax.tools import align as align_tool

# insightface python-package/insightface/utils/face_align.py: arcface_dst (written out here,
# so a changed template in askd_jax fails these tests).
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def _similarity(scale, angle_deg, shift):
  a = np.deg2rad(angle_deg)
  m = np.eye(3)
  m[:2, :2] = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  m[:2, 2] = shift
  return m


def _photo_with_spots(h, w, points, sigma):
  """A dark photo with one bright Gaussian spot per landmark (RGB, uint8)."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  img = np.zeros((h, w))
  for x, y in points:
    img += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
  g = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return np.stack([g, g // 2, 255 - g], -1)


def _centroid(gray, x, y, r=6):
  y0, x0 = int(round(y)), int(round(x))
  win = gray[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1].astype(np.float64)
  yy, xx = np.mgrid[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1]
  return (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()


@pytest.mark.parametrize("scale,angle,shift", [(1.8, 23.0, (40.0, -30.0)),
                                               (0.7, -35.0, (90.0, 110.0))])
def test_aligned_crop_puts_the_landmarks_on_the_template(scale, angle, shift):
  """A photo made by a chosen similarity transform of the template: its 5 points land on
  ARCFACE_TEMPLATE in the crop (spot centroids within 0.5 px)."""
  m = _similarity(scale, angle, shift)
  tmpl = ARCFACE_DST.astype(np.float64)
  pts = tmpl @ m[:2, :2].T + m[:2, 2]
  photo = _photo_with_spots(260, 300, pts, sigma=2.0 * scale)
  np.testing.assert_allclose(align.similarity_matrix(pts), np.linalg.inv(m), atol=1e-4)
  crop = align.align_face(photo, pts)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  for (tx, ty) in tmpl:
    cx, cy = _centroid(crop[:, :, 0], tx, ty)
    assert abs(cx - tx) < 0.5 and abs(cy - ty) < 0.5, ((cx, cy), (tx, ty))


def test_equals_insightface_norm_crop_within_one_grey_level():
  """insightface's norm_crop: skimage's SimilarityTransform estimate + cv2.warpAffine
  (bilinear, border 0). Noisy landmarks, a textured photo, a crop reaching past its border."""
  cv2 = pytest.importorskip("cv2")
  from skimage import transform as sk
  rng = np.random.default_rng(3)
  tmpl = ARCFACE_DST.astype(np.float64)
  outside = 0
  for trial in range(4):
    m = _similarity(rng.uniform(0.6, 2.5), rng.uniform(-40, 40), rng.uniform(-20, 60, 2))
    pts = (tmpl @ m[:2, :2].T + m[:2, 2] + rng.normal(0, 2.0, (5, 2))).astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:230]
    photo = np.stack([np.sin(xx / 3.0) * 120 + 128, np.cos(yy / 4.0) * 120 + 128,
                      rng.integers(0, 256, xx.shape)], -1).astype(np.uint8)
    ref_m = sk.SimilarityTransform.from_estimate(pts, ARCFACE_DST).params
    ref = cv2.warpAffine(photo, ref_m[:2], (112, 112), borderValue=0.0)
    np.testing.assert_allclose(align.similarity_matrix(pts), ref_m, rtol=0, atol=1e-12)
    ours = align.align_face(photo, pts)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, (trial, diff.max())
    assert (diff == 0).mean() > 0.99
    corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]]) @ np.linalg.inv(
        ref_m).T
    outside += np.any((corners[:, 0] < 0) | (corners[:, 0] > 229) | (corners[:, 1] < 0)
                      | (corners[:, 1] > 199))
  assert outside >= 1  # the border (constant 0) is part of the comparison


def _write_photos(root, names, rng):
  photos = {}
  tmpl = ARCFACE_DST.astype(np.float64)
  lines = []
  for k, name in enumerate(names):
    m = _similarity(1.0 + 0.3 * k, 10.0 * k, (20.0 + 5 * k, 15.0))
    pts = tmpl @ m[:2, :2].T + m[:2, 2]
    photo = rng.integers(0, 256, (180, 200, 3), dtype=np.uint8)
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(photo).save(path)
    photos[name] = (photo, pts.astype(np.float32))
    lines.append(name + " " + " ".join(f"{v:.3f}" for v in pts.reshape(-1)) + " 0.9")
  return photos, lines


def test_align_cli_writes_the_crops_of_align_face(tmp_path, capsys):
  rng = np.random.default_rng(0)
  photos, lines = _write_photos(str(tmp_path / "img"), ["a.jpg", "sub/b.png"], rng)
  lm = tmp_path / "lm.txt"
  lm.write_text("# name x1 y1 ... score\n" + "\n".join(lines) + "\n")
  out = tmp_path / "out"
  assert align_tool.main([f"--images={tmp_path / 'img'}", f"--landmarks={lm}",
                          f"--out={out}"]) == 0
  for name in photos:
    line = next(l for l in lines if l.startswith(name))
    pts = np.array(line.split()[1:11], np.float32).reshape(5, 2)
    got = np.asarray(Image.open(out / align_tool.crop_name(name)))
    photo = align.read_photo(str(tmp_path / "img" / name))  # as decoded (the JPEG is lossy)
    np.testing.assert_array_equal(got, align.align_face(photo, pts))
  assert sorted(os.listdir(tmp_path)) == ["img", "lm.txt", "out"]  # no temporary left


@pytest.mark.parametrize("bad,what", [
    ("a.jpg 1 2 3 4 5 6 7 8 9", "lm.txt line 2: 9 values after the name 'a.jpg'"),
    ("missing.jpg 1 2 3 4 5 6 7 8 9 10", "lm.txt line 2: image"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 x", "lm.txt line 2: 'x' is not a number"),
    ("junk.jpg 1 2 3 4 5 6 7 8 9 10", "junk.jpg: not a readable image"),  # while writing
])
def test_align_cli_bad_input_one_line_nothing_written(tmp_path, capsys, bad, what):
  rng = np.random.default_rng(1)
  _, lines = _write_photos(str(tmp_path / "img"), ["b.jpg"], rng)
  (tmp_path / "img" / "junk.jpg").write_bytes(b"not a jpeg")
  lm = tmp_path / "lm.txt"
  lm.write_text(lines[0] + "\n" + bad + "\n")
  out = tmp_path / "out"
  assert align_tool.main([f"--images={tmp_path / 'img'}", f"--landmarks={lm}",
                          f"--out={out}"]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and what in err, err
  assert sorted(os.listdir(tmp_path)) == ["img", "lm.txt"]  # no --out, no temporary


def test_align_cli_usage_error_exit_2(tmp_path):
  with pytest.raises(SystemExit) as e:
    align_tool.main([f"--images={tmp_path}", f"--landmarks={tmp_path}/x", f"--out={tmp_path}/o",
                     "--size=100"])
  assert e.value.code == 2
