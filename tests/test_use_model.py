"""Using a trained model: askd_jax.load, the embed / verify / search / export tools.

Driven on the tiny demo run that tests/test_notebooks.py trains once per session (28 px ORL,
4 steps per stage: teacher, a 7 px student without and one with A-SKD) and on a random
official-format PyTorch checkpoint converted with tools.convert (torch optional).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import askd_jax
from askd_jax import api
from askd_jax.data import orl
from askd_jax.tools import embed as embed_cli
from askd_jax.tools import export as export_cli
from askd_jax.tools import search as search_cli
from askd_jax.tools import verify as verify_cli
from test_notebooks import tiny_run  # noqa: F401  the session's trained demo run

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(workdir):
  from askd_jax.evaluate.attention import load_config
  return load_config(workdir)


def _same_embeddings(a, b):
  """Equal up to float32 rounding: the same images in batches of other sizes run through
  XLA programs of other shapes, whose sums round differently (up to ~1e-6 of the largest
  entry, measured ~8e-7 on this tiny model)."""
  b = np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(np.abs(b).max()))


@pytest.fixture(scope="module")
def demo(tiny_run):  # noqa: F811
  """The run's ORL test images and pairs, as its evaluation sees them."""
  cfg = _cfg(tiny_run)
  d = orl.load_demo(cfg.data.data_dir, cfg.data.image_size, num_pairs=cfg.data.num_pairs)
  return tiny_run, cfg, d


def _run(main, argv, capsys):
  rc = main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def _one_line(err):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


# --- the API on the trained demo model ------------------------------------------------------

def test_api_embeddings_are_the_evaluations(demo):
  """The API's embeddings are the evaluation's: through the official 10-fold protocol they
  give the accuracy in the stage's eval.json, for the teacher at HR and a student at 7 px;
  and a person's photos are closer to each other than to other people's."""
  from askd_jax.evaluate.verification import verification_accuracy
  workdir, cfg, d = demo
  images, pairs = d["test_images"], d["pairs"]
  for stage, size, key in (("teacher", None, "HR"), ("student_askd_7px", 7, "7")):
    model = askd_jax.load(os.path.join(workdir, stage), batch_size=cfg.eval.batch_size)
    assert model.input_size == cfg.data.image_size
    emb = model.embed(images, size=size)
    assert emb.shape == (len(images), 2 * model.spec["embedding_dim"]) and emb.dtype == np.float32
    with open(os.path.join(workdir, stage, "eval.json")) as f:
      want = json.load(f)[key]["orl_test"]["accuracy"]
    r = verification_accuracy(emb[pairs["idx1"]], emb[pairs["idx2"]], pairs["issame"])
    assert r["mean"] == pytest.approx(want, abs=1e-12), stage
    sims = model.similarity(emb[pairs["idx1"]], emb[pairs["idx2"]])
    assert sims[pairs["issame"]].mean() > sims[~pairs["issame"]].mean() + 0.01, stage
  # one image -> one vector; paths, arrays and a gray array give the same numbers
  model = askd_jax.load(os.path.join(workdir, "teacher"), batch_size=4)
  one = model.embed(images[5])
  assert one.shape == (emb.shape[1],)
  teacher = askd_jax.load(os.path.join(workdir, "teacher"))
  _same_embeddings(one, teacher.embed(images[:8])[5])
  assert model.similarity(one, one) == pytest.approx(1.0, abs=1e-6)


def test_api_paths_gray_and_bad_images(demo, tmp_path):
  workdir, cfg, d = demo
  model = askd_jax.load(os.path.join(workdir, "teacher"), batch_size=4)
  s = model.input_size
  gray = d["test_images"][:2, :, :, 0]  # ORL photos are gray replicated to RGB
  Image.fromarray(gray[0]).save(tmp_path / "a.png")
  Image.fromarray(d["test_images"][1]).save(tmp_path / "b.jpg", quality=100)
  by_path = model.embed([tmp_path / "a.png", str(tmp_path / "b.jpg")])
  by_array = model.embed([gray[0], np.asarray(Image.open(tmp_path / "b.jpg").convert("RGB"))])
  np.testing.assert_array_equal(by_path, by_array)
  np.testing.assert_allclose(by_array[0], model.embed(d["test_images"][0]), atol=1e-6)
  with pytest.raises(api.ImageSizeError, match=f"{s}x{s} aligned face crops.*norm_crop"):
    model.embed(np.zeros((s + 4, s, 3), np.uint8))
  with pytest.raises(api.ModelError, match="uint8"):
    model.embed(np.zeros((s, s, 3), np.float32))
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(api.ImageError, match="bad.png: not a readable image"):
    model.embed([tmp_path / "bad.png"])
  with pytest.raises(api.ModelError, match="degradation size must be in 1"):
    model.embed(d["test_images"][:1], size=s + 1)


def test_load_errors(demo, tmp_path):
  workdir, _, _ = demo
  with pytest.raises(api.ModelError, match="no such model.*tools.convert"):
    askd_jax.load(tmp_path / "absent")
  with pytest.raises(api.ModelError, match="is a workdir, not a model.*teacher"):
    askd_jax.load(workdir)
  other = tmp_path / "classifier"
  other.mkdir()
  (other / "model.json").write_text(json.dumps({"task": "classification", "arch": "resnet"}))
  with pytest.raises(api.ModelError, match="'classification' model.*facerec"):
    askd_jax.load(other)
  (tmp_path / "junk.jaxexport").write_bytes(b"\0" * 64)
  with pytest.raises(api.ModelError, match="not a model written by .*tools.export"):
    askd_jax.load(tmp_path / "junk.jaxexport")


# --- the command-line tools on the trained demo model ---------------------------------------

def _orl_folder(root, d, people, photos, size):
  """ORL test photos as PNG files in one folder per person; returns their paths."""
  paths = []
  for p in people:
    (root / f"s{p}").mkdir(parents=True, exist_ok=True)
    for k in photos:
      i = int(np.flatnonzero((d["test_person"] == p))[k - 1])
      path = root / f"s{p}" / f"{k}.png"
      Image.fromarray(d["test_images"][i]).save(path)
      paths.append(str(path))
  assert d["test_images"].shape[1] == size
  return paths


def test_embed_cli_skips_bad_images_and_search_finds_the_person(demo, tmp_path, capsys):
  """embed writes every good image's vector beside its path, lists each unreadable or
  wrong-size image on one line and exits 1; search ranks the gallery by cosine."""
  workdir, cfg, d = demo
  teacher = os.path.join(workdir, "teacher")
  people = sorted(set(d["test_person"].tolist()))[:4]
  folder = tmp_path / "faces"
  good = _orl_folder(folder, d, people, (1, 2, 3), cfg.data.image_size)
  (folder / "broken.png").write_bytes(b"\x89PNG but not really")
  Image.new("RGB", (40, 40)).save(folder / "s0_big.png")
  out = tmp_path / "gallery.npz"
  rc, stdout, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={folder}",
                                          f"--out={out}", "--batch_size=8"], capsys)
  assert rc == 1
  skipped = [l for l in err.splitlines() if l.startswith("skipped ")]
  assert len(skipped) == 2, err
  assert any("broken.png: not a readable image" in l for l in skipped)
  s = cfg.data.image_size
  assert any(f"s0_big.png: 40x40 pixels, but the model takes {s}x{s}" in l for l in skipped)
  assert "skipped 2 image(s)" in stdout and str(out) in stdout
  with np.load(out) as z:
    assert [str(p) for p in z["paths"]] == sorted(good)
    assert sorted(map(str, z["skipped"])) == [str(folder / "broken.png"),
                                              str(folder / "s0_big.png")]
    emb = z["embeddings"]
    assert int(z["size"]) == 0 and int(z["input_size"]) == s
  model = askd_jax.load(teacher)
  _same_embeddings(emb, model.embed(sorted(good)))

  # nothing is overwritten without --overwrite
  rc, _, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={folder}",
                                     f"--out={out}"], capsys)
  assert rc == 1 and "--overwrite" in _one_line(err)

  # search: a gallery image as probe finds itself first, similarity 1, then the ranking of
  # the API's cosines
  probe = sorted(good)[4]
  rc, stdout, err = _run(search_cli.main, [f"--model={teacher}", f"--gallery={out}",
                                           f"--probe={probe}", "--k=3"], capsys)
  assert rc == 0, err
  rows = [l.split() for l in stdout.splitlines()[1:]]
  assert len(rows) == 3 and rows[0][2] == probe
  assert float(rows[0][1]) == pytest.approx(1.0, abs=1e-4)
  sims = model.similarity(emb, model.embed(probe))
  want = [sorted(good)[i] for i in np.argsort(-sims, kind="stable")[:3]]
  assert [r[2] for r in rows] == want
  np.testing.assert_allclose([float(r[1]) for r in rows], np.sort(sims)[::-1][:3], atol=1e-4)

  # a gallery embedded by another model is refused
  rc, _, err = _run(search_cli.main, [f"--model={os.path.join(workdir, 'student_askd_7px')}",
                                      f"--gallery={out}", f"--probe={probe}"], capsys)
  assert rc == 1 and "embedded by another model" in _one_line(err)


def test_embed_cli_list_file_and_errors(demo, tmp_path, capsys):
  workdir, cfg, d = demo
  teacher = os.path.join(workdir, "teacher")
  people = sorted(set(d["test_person"].tolist()))[:2]
  paths = _orl_folder(tmp_path / "faces", d, people, (1, 2), cfg.data.image_size)
  lst = tmp_path / "list.txt"
  lst.write_text("# aligned crops\n" + "\n".join(os.path.relpath(p, tmp_path) for p in paths)
                 + "\n\n")
  out = tmp_path / "e.npz"
  rc, _, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={lst}", f"--out={out}",
                                     "--size=7"], capsys)
  assert rc == 0, err
  with np.load(out) as z:
    assert [str(p) for p in z["paths"]] == paths and int(z["size"]) == 7
    _same_embeddings(z["embeddings"], askd_jax.load(teacher).embed(paths, size=7))
  (tmp_path / "empty").mkdir()
  cases = [([f"--model={teacher}", f"--images={tmp_path / 'empty'}"], "holds no image files"),
           ([f"--model={tmp_path / 'nope'}", f"--images={lst}"], "no such model"),
           ([f"--model={teacher}", f"--images={tmp_path / 'nothing'}"], "no such folder or list")]
  for argv, want in cases:
    rc, _, err = _run(embed_cli.main, argv + [f"--out={tmp_path / 'x.npz'}"], capsys)
    assert rc == 1 and want in _one_line(err), (argv, err)
    assert not (tmp_path / "x.npz").exists()


def test_embed_cli_landmarks_aligns_raw_photos(demo, tmp_path, capsys):
  """--landmarks: insightface-format photos + 5 points (an IJB fixture release) are aligned
  at the model's input size and embedded; a bad line stops the run, a missing photo is
  skipped naming its line."""
  from askd_jax.data import align, fixtures
  workdir, cfg, _ = demo
  teacher = os.path.join(workdir, "teacher")
  rel = fixtures.write_ijb_release(str(tmp_path), "ijbc", layout=fixtures.IJB_LAYOUT[:5])
  photos = os.path.join(rel["root"], "loose_crop")
  lm = os.path.join(rel["root"], "meta", "ijbc_name_5pts_score.txt")
  out = tmp_path / "e.npz"
  rc, _, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={photos}",
                                     f"--landmarks={lm}", f"--out={out}"], capsys)
  assert rc == 0, err
  paths = [os.path.join(photos, n) for n in rel["names"]]
  crops = [align.model_crop(align.read_photo(p), e.points, cfg.data.image_size)
           for p, e in zip(paths, align.read_landmarks(lm))]
  with np.load(out) as z:
    assert [str(p) for p in z["paths"]] == paths
    _same_embeddings(z["embeddings"], askd_jax.load(teacher).embed(np.stack(crops)))
  os.remove(paths[2])
  rc, _, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={photos}",
                                     f"--landmarks={lm}", f"--out={tmp_path / 'm.npz'}"], capsys)
  assert rc == 1 and err.startswith(f"skipped {lm} line 3: {paths[2]}: no such image file\n"), err
  with np.load(tmp_path / "m.npz") as z:
    assert [str(p) for p in z["skipped"]] == [paths[2]] and len(z["paths"]) == 4
  bad = tmp_path / "bad.txt"
  bad.write_text(open(lm).readline() + "2.jpg 1 2 3\n")
  rc, _, err = _run(embed_cli.main, [f"--model={teacher}", f"--images={photos}",
                                     f"--landmarks={bad}", f"--out={tmp_path / 'x.npz'}"], capsys)
  assert rc == 1 and f"{bad} line 2: 3 values after the name '2.jpg'" in _one_line(err), err
  assert not (tmp_path / "x.npz").exists()


def _threshold_fixture(stage_dir, dest, d, size=None):
  """A copy of a trained stage with the eval.json its run wrote ({resolution: {set:
  {accuracy, std, threshold, ...}}}); the stored threshold must be the deploy threshold of
  the API's own embeddings of the test pairs (the evaluation and the API agree)."""
  from askd_jax.evaluate.verification import deploy_threshold
  shutil.copytree(stage_dir, dest)
  model = askd_jax.load(dest)
  emb = model.embed(d["test_images"], size=size)
  p = d["pairs"]
  key = str(size) if size else "HR"
  ev = json.loads((dest / "eval.json").read_text())
  thr = ev[key]["orl_test"]["threshold"]
  assert thr == deploy_threshold(emb[p["idx1"]], emb[p["idx2"]], p["issame"])
  return model, emb, thr


def test_verify_cli(demo, tmp_path, capsys):
  workdir, cfg, d = demo
  model, emb, thr = _threshold_fixture(os.path.join(workdir, "teacher"), tmp_path / "teacher", d)
  acc = json.loads((tmp_path / "teacher" / "eval.json").read_text())["HR"]["orl_test"]["accuracy"]
  people = sorted(set(d["test_person"].tolist()))
  paths = _orl_folder(tmp_path / "faces", d, people[:2], (1, 2), cfg.data.image_size)
  for a, b in ((paths[0], paths[1]), (paths[0], paths[2])):
    rc, out, err = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", a, b], capsys)
    assert rc == 0, err
    ea, eb = model.embed([a, b])
    sim = model.similarity(ea, eb)  # the plain cosine the deploy threshold applies to
    verdict = "same person" if sim > thr else "different people"
    assert out.strip() == (f"{a} {b}: similarity {sim:.4f}, {verdict} "
                           f"(threshold {thr:.4f} "
                           f"chosen by the verification on orl_test at HR, accuracy {acc:.4f})")
  rc, out, _ = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", paths[0], paths[1],
                                      "--threshold=2"], capsys)
  assert rc == 0 and "different people (threshold 2.0000 given by --threshold)" in out
  # no evaluation at this resolution / at all / without thresholds: one line, the fix
  evaluated = ", ".join(k for k in json.loads((tmp_path / "teacher" / "eval.json").read_text())
                        if not k.startswith("_"))
  rc, _, err = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", "--size=9",
                                      paths[0], paths[1]], capsys)
  line = _one_line(err)
  assert rc == 1 and f"evaluated at {evaluated} but not at 9" in line and "--eval_sizes=9" in line
  (tmp_path / "teacher" / "eval.json").write_text(json.dumps(
      {"HR": {"orl_test": {"accuracy": 0.9, "std": 0.01}}}))
  rc, _, err = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", paths[0], paths[1]],
                    capsys)
  assert rc == 1 and "holds no verification threshold" in _one_line(err)
  os.remove(tmp_path / "teacher" / "eval.json")
  rc, _, err = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", paths[0], paths[1]],
                    capsys)
  line = _one_line(err)
  assert rc == 1 and "has no evaluation" in line
  assert f"python -m askd_jax.main --config=CONFIG --evaluate={tmp_path / 'teacher'}" in line
  # an image of the wrong size
  Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
  rc, _, err = _run(verify_cli.main, [f"--model={tmp_path / 'teacher'}", "--threshold=0.5",
                                      str(tmp_path / "big.png"), paths[0]], capsys)
  line = _one_line(err)
  assert rc == 1 and "big.png: 64x64 pixels" in line and "align" in line


def test_verify_cli_subprocess_exit_code_and_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "askd_jax.tools.verify",
                         f"--model={tmp_path / 'absent'}", "a.png", "b.png"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stdout == ""
  assert _one_line(proc.stderr).startswith("python -m askd_jax.tools.verify: error: ")
  assert "no such model" in proc.stderr


# --- export: runs with JAX alone ------------------------------------------------------------

_CLEAN = r"""
import importlib.util, json, sys
sys.path[:] = [p for p in sys.path if p]  # no cwd
sys.path.append(SITE)                     # plain directory: its .pth files (the editable
assert importlib.util.find_spec("askd_jax") is None, "askd_jax is importable"  # finder) unread
import jax, numpy as np
jax.config.update("jax_platforms", "cpu")
out = {}
for name, (path, images) in json.loads(sys.argv[1]).items():
  exp = jax.export.deserialize(bytearray(open(path, "rb").read()))
  x = np.load(images)
  out[name] = np.concatenate([np.asarray(exp.call(x[:3])), np.asarray(exp.call(x[3:]))])
np.savez("out.npz", **out)
print("ran", sorted(out), "without askd_jax")
"""


def _close(got, want, tol=1e-5):
  """Equal up to float32 rounding: parameters baked in as constants let XLA fold them
  differently, so raw embeddings (norm ~30-90) move by ~2e-5 absolute: compare relatively
  (measured: <= 6e-7 of the largest value, <= 1.1e-7 after L2 normalisation)."""
  assert got.shape == want.shape
  rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
  unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  return rel <= tol and np.max(np.abs(unit(got) - unit(want))) <= tol


def _clean_python(tmp_path, args):
  """Run _CLEAN in a python that cannot import askd_jax: -I (no cwd, no PYTHON* variables,
  no user site) -S (no site: the editable install's path finder is never registered), with
  site-packages added back as a plain directory for jax and numpy."""
  import site
  code = _CLEAN.replace("SITE", repr(site.getsitepackages()[0]))
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  control = subprocess.run([sys.executable, "-c", "import importlib.util; print("
                            "importlib.util.find_spec('askd_jax') is not None)"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
  assert control.stdout.strip() == "True"  # without the isolation it would be importable
  return subprocess.run([sys.executable, "-I", "-S", "-c", code, json.dumps(args)],
                        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def test_export_runs_without_askd_jax(demo, tmp_path, capsys):
  """The exported teacher (HR) and 7 px student run in a python without askd_jax, any batch
  size, and give the in-project embeddings; askd_jax.load and verify read them back."""
  workdir, cfg, d = demo
  images = d["test_images"][::15][:8]  # 8 photos, several people
  np.save(tmp_path / "images.npy", images)
  args, want = {}, {}
  for stage, size in (("teacher", 0), ("student_askd_7px", 7)):
    out = tmp_path / f"{stage}.jaxexport"
    rc, stdout, err = _run(export_cli.main, [f"--model={os.path.join(workdir, stage)}",
                                             f"--out={out}", f"--size={size}"], capsys)
    assert rc == 0, err
    assert "wrote" in stdout and "(batch, " in stdout
    args[stage] = [str(out), str(tmp_path / "images.npy")]
    want[stage] = askd_jax.load(os.path.join(workdir, stage)).embed(images, size=size or None)
    meta = json.loads((tmp_path / f"{stage}.jaxexport.json").read_text())
    assert meta["size"] == (size or None) and meta["spec"]["input_size"] == cfg.data.image_size
    # askd_jax reads it back, with the degradation built in and the evaluation beside it
    exported = askd_jax.load(out, batch_size=4)
    assert _close(exported.embed(images), want[stage]), stage
    with pytest.raises(api.ModelError, match="export it again with --size=14"):
      exported.embed(images, size=14)
  rc, _, err = _run(export_cli.main, [f"--model={os.path.join(workdir, 'teacher')}",
                                      f"--out={tmp_path / 'teacher.jaxexport'}"], capsys)
  assert rc == 1 and "--overwrite" in _one_line(err)

  proc = _clean_python(tmp_path, args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "without askd_jax" in proc.stdout
  with np.load(tmp_path / "out.npz") as z:
    for stage in args:
      assert _close(z[stage], want[stage]), stage


# --- a converted official checkpoint: BGR handled for the user ------------------------------

SMALL = dict(stage_sizes=(1, 2, 1, 1), width=0.25)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """A random official-format net converted twice: for RGB input (the default, the stem
  reversed) and keeping the official BGR stem (the model reverses the input itself)."""
  torch = pytest.importorskip("torch", reason="reading .ckpt files needs torch (optional)")
  from askd_jax.tools import convert
  from askd_jax.tools import torch_reference as tr
  torch.manual_seed(0)
  net = tr.randomize_(tr.iresnet_cbam(**SMALL, input_size=56), seed=3).eval()
  d = tmp_path_factory.mktemp("official")
  torch.save({"iters": 10, "net_state_dict": net.state_dict()}, d / "last_net.ckpt")
  dirs = {}
  for order in ("rgb", "bgr"):
    dirs[order] = d / order
    assert convert.main([f"--net={d / 'last_net.ckpt'}", f"--out={dirs[order]}",
                         f"--channel_order={order}", "--input_size=56"]) == 0
  return torch, net, dirs


def _official_embedding(torch, net, rgb):
  """The official test path: BGR (OpenCV), (x / 255 - 0.5) / 0.5, NCHW, concat(f, f_flip)."""
  bgr = rgb[..., ::-1].astype(np.float32)
  x = torch.from_numpy(np.ascontiguousarray(((bgr / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)))
  with torch.no_grad():
    f, _ = net(x)
    f_flip, _ = net(torch.flip(x, dims=[3]))
  return torch.cat([f, f_flip], 1).numpy()


def test_converted_checkpoint_takes_rgb(official, demo, tmp_path, capsys):
  """The user passes RGB; both conversions equal the official network fed BGR."""
  torch, net, dirs = official
  _, _, d = demo
  faces = tmp_path / "faces"
  paths = _orl_folder(faces, d, sorted(set(d["test_person"].tolist()))[:1], (1,), 28)
  rng = np.random.RandomState(0)
  rgb = rng.randint(0, 256, (5, 56, 56, 3)).astype(np.uint8)
  rgb[..., 0] = rng.randint(0, 40, (5, 56, 56))  # red differs from blue: order matters
  want = _official_embedding(torch, net, rgb)
  swapped = _official_embedding(torch, net, rgb[..., ::-1])
  assert np.max(np.abs(want - swapped)) > 1e-2  # the check can fail
  for order, path in dirs.items():
    model = askd_jax.load(path, batch_size=4)
    assert model.spec["channel_order"] == order
    got = model.embed(rgb)
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.abs(want).max()), order
  # the tools on it: a 28 px photo is refused with the size and how to align
  rc, _, err = _run(verify_cli.main, [f"--model={dirs['bgr']}", "--threshold=0.3",
                                      paths[0], paths[0]], capsys)
  assert rc == 1 and "28x28 pixels, but the model takes 56x56 aligned face crops" in err
  Image.fromarray(rgb[0]).save(faces / "a.png")
  Image.fromarray(rgb[1]).save(faces / "b.png")
  rc, out, err = _run(verify_cli.main, [f"--model={dirs['bgr']}", "--threshold=0.3",
                                        str(faces / "a.png"), str(faces / "b.png")], capsys)
  sim = api.FaceModel.similarity(want[0], want[1])
  assert rc == 0 and f"similarity {sim:.4f}" in out, err
