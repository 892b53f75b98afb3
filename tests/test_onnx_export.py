"""ONNX export (`python -m askd_jax.tools.export --format=onnx`), checked with onnxruntime.

Each exported file runs in a python that imports only onnxruntime and numpy (no jax, no
askd_jax) on real ORL photos at batch sizes 1 and 7, and gives the JAX model's embeddings
within 1e-5 relative; onnx.checker passes; the metadata is read back. Driven on the session's
tiny demo run (conftest.tiny_facerec_run: 28 px ORL, a teacher and 7 px students) and on a
random official-format iResNet50-CBAM checkpoint at 112 px converted with tools.convert
(torch optional).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import askd_jax
from askd_jax import api, evalfile
from askd_jax.data import orl
from askd_jax.evaluate import verification
from askd_jax.tools import export as export_cli
from askd_jax.tools import verify as verify_cli
from conftest import tiny_facerec_cfg
from test_use_model import _clean_python, _close, _one_line, _run

pytestmark = pytest.mark.slow

# Reads the metadata and feeds the input as a deployment would: onnxruntime and numpy only.
_CLEAN_ORT = r"""
import importlib.util, json, sys
sys.path[:] = [p for p in sys.path if p]  # no cwd
sys.path.append(SITE)
assert importlib.util.find_spec("askd_jax") is None, "askd_jax is importable"
import numpy as np, onnxruntime as ort
out, meta = {}, {}
for name, (path, images) in json.loads(sys.argv[1]).items():
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  m = meta[name] = sess.get_modelmeta().custom_metadata_map
  x = np.load(images)  # uint8 (N, S, S, 3) RGB photos
  if m["channel_order"] == "bgr":
    x = x[..., ::-1]
  x = (x.astype(np.float32) - float(m["input_mean"])) / float(m["input_std"])
  x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NCHW
  run = lambda b: sess.run(["embedding"], {"images": b})[0]
  out[name + "__b1"] = np.concatenate([run(x[i:i + 1]) for i in range(3)])
  out[name + "__b7"] = run(x[:7])
  out[name + "__all"] = run(x)
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("jax", "jaxlib", "flax", "askd_jax"))
assert not bad, bad
np.savez("ort.npz", **out)
json.dump(meta, open("ort_meta.json", "w"))
print("ran", sorted(meta), "with onnxruntime and numpy only")
"""


def _export(capsys, model_dir, out, *extra):
  rc, stdout, err = _run(export_cli.main, [f"--model={model_dir}", "--format=onnx",
                                           f"--out={out}", *extra], capsys)
  assert rc == 0, err
  assert f"wrote {out}" in stdout and "NCHW" in stdout
  import onnx
  onnx.checker.check_model(str(out), full_check=True)


def _run_clean(tmp_path, files):
  """{name: (onnx path, images .npy)} -> ({name__b1|b7|all: outputs}, {name: metadata})."""
  proc = _clean_python(tmp_path, {k: [str(a), str(b)] for k, (a, b) in files.items()},
                       _CLEAN_ORT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "with onnxruntime and numpy only" in proc.stdout
  with np.load(tmp_path / "ort.npz") as z:
    out = dict(z)
  return out, json.loads((tmp_path / "ort_meta.json").read_text())


def _check_batches(out, name, want):
  """Batch 1 (3 photos), batch 7 and all the photos equal the JAX embeddings."""
  for key, n in (("b1", 3), ("b7", 7), ("all", len(want))):
    assert _close(out[f"{name}__{key}"], want[:n]), (name, key)


def test_demo_model_onnx(tiny_facerec_run, tmp_path, capsys):
  """The demo's teacher (flip-concat, plain, and with BatchNorm folded) and its 7 px A-SKD
  student (the degradation built in) through onnxruntime: the JAX embeddings, the metadata,
  and the verification accuracy of eval.json on the same pairs; askd_jax.load and the verify tool run the files.
  Pins the CBAM channel MLP's stacked form (models/cbam.py): with its former concat on the
  batch axis and slices at B, this test failed (seen once: "jax2onnx could not convert the
  model (TypeError: add got incompatible shapes for broadcasting: (batch, 8), (0, 8))")."""
  wd, data_dir, _ = tiny_facerec_run
  cfg = tiny_facerec_cfg(data_dir)
  d = orl.load_demo(str(data_dir), cfg.data.image_size, num_pairs=cfg.data.num_pairs)
  images = d["test_images"]  # 120 real ORL photos, as the evaluation sees them
  np.save(tmp_path / "images.npy", images)
  teacher, student = os.path.join(wd, "teacher"), os.path.join(wd, "student_askd_7px")
  files, want, jax_emb = {}, {}, {}
  for name, stage, extra, size in (("teacher", teacher, [], None),
                                   ("plain", teacher, ["--embedding=plain"], None),
                                   ("folded", teacher, ["--fold_bn"], None),
                                   ("student", student, ["--size=7"], 7)):
    files[name] = (tmp_path / f"{name}.onnx", tmp_path / "images.npy")
    _export(capsys, stage, files[name][0], *extra)
    if (stage, size) not in jax_emb:  # one JAX model (and compilation) per stage
      jax_emb[stage, size] = askd_jax.load(stage).embed(images, size=size)
    want[name] = jax_emb[stage, size]
  d_emb = cfg.model.embedding_dim
  want["plain"] = want["plain"][:, :d_emb]  # emb(x) without the flipped view
  import onnx
  plain_ops = {n.op_type for n in onnx.load(files["teacher"][0]).graph.node}
  folded = onnx.load(files["folded"][0])
  assert "Sqrt" in plain_ops and "Sqrt" not in {n.op_type for n in folded.graph.node}
  assert {n.domain for n in folded.graph.node} <= {"", "ai.onnx"}  # standard ops only
  out, meta = _run_clean(tmp_path, files)
  for name in files:
    _check_batches(out, name, want[name])

  # the metadata says what a consumer needs
  t_eval, s_eval = (evalfile.read(os.path.join(s, evalfile.FILE))["evaluations"][0]["results"]
                    for s in (teacher, student))  # the run's own evaluation
  m = meta["teacher"]
  assert (m["input_size"], m["input_layout"], m["channel_order"]) == ("28", "NCHW", "rgb")
  assert (m["input_mean"], m["input_std"]) == ("127.5", "127.5")
  assert (m["embedding"], m["embedding_size"]) == ("flip_concat", str(2 * d_emb))
  assert float(m["threshold"]) == t_eval["HR"]["orl_test"]["threshold"]
  assert m["training_resolution"].startswith("28 px (high resolution)")
  assert json.loads(m["spec"])["embedding_dim"] == d_emb
  assert (meta["plain"]["embedding"], meta["plain"]["embedding_size"]) == ("plain", str(d_emb))
  assert "threshold" not in meta["plain"] and "does not apply" in meta["plain"]["threshold_note"]
  m = meta["student"]
  assert m["degradation_size"] == "7" and m["training_resolution"].startswith("7 px")
  assert float(m["threshold"]) == s_eval["7"]["orl_test"]["threshold"]

  # the evaluation's protocol on the ONNX embeddings gives eval.json's accuracy
  p = d["pairs"]
  for name, want_acc in (("teacher", t_eval["HR"]["orl_test"]["accuracy"]),
                         ("student", s_eval["7"]["orl_test"]["accuracy"])):
    e = out[f"{name}__all"]
    r = verification.verification_accuracy(e[p["idx1"]], e[p["idx2"]], p["issame"], nfolds=10)
    assert float(r["mean"]) == want_acc, name

  # askd_jax.load runs the files (a plain one on the image and its flip: flip-concat)
  assert meta["folded"]["bn_folded"] == "true" and meta["teacher"]["bn_folded"] == "false"
  for name, ref in (("teacher", "teacher"), ("plain", "teacher"), ("student", "student")):
    model = askd_jax.load(files[name][0], batch_size=16)
    assert _close(model.embed(images[:7]), want[ref][:7]), name
  assert askd_jax.load(files["student"][0]).threshold().resolution == "7"
  from PIL import Image
  for i in (0, 1):
    Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
  rc, stdout, err = _run(verify_cli.main, [f"--model={files['teacher'][0]}",
                                           str(tmp_path / "0.png"), str(tmp_path / "1.png")],
                         capsys)
  sim = api.FaceModel.similarity(want["teacher"][0], want["teacher"][1])
  assert rc == 0 and f"similarity {sim:.4f}" in stdout, err


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
  """Not a face model, an unsupported opset, the converter missing, an existing --out, an
  .onnx that is not askd_jax's: one line naming the fix, non-zero exit (the options are
  checked before the model is loaded, so no model is needed for them)."""
  teacher = tmp_path / "teacher"
  out = tmp_path / "m.onnx"
  other = tmp_path / "classifier"
  other.mkdir()
  (other / "model.json").write_text(json.dumps({"task": "classification", "arch": "resnet"}))
  cases = [([f"--model={other}"], "'classification' model"),
           ([f"--model={teacher}", "--opset=13"], "--opset=13: unsupported; choose 18..23"),
           ([f"--model={tmp_path / 'absent'}"], "no such model")]
  for argv, expect in cases:
    rc, stdout, err = _run(export_cli.main, [*argv, "--format=onnx", f"--out={out}"], capsys)
    assert rc == 1 and expect in _one_line(err), err
    assert not out.exists()
  with monkeypatch.context() as mp:
    mp.setitem(sys.modules, "jax2onnx", None)  # as if not installed: import raises
    rc, _, err = _run(export_cli.main, [f"--model={teacher}", "--format=onnx",
                                        f"--out={out}"], capsys)
    assert rc == 1 and "pip install -r requirements-deploy.txt" in _one_line(err)
    assert "jax2onnx" in err
  for flag in ("--embedding=plain", "--opset=18"):  # an onnx option without --format=onnx
    with pytest.raises(SystemExit) as e:  # usage, exit 2 (--opset=18 passed before: it was
      export_cli.main([f"--model={teacher}", flag, f"--out={out}"])  # the default's value)
    assert e.value.code == 2 and "options of --format=onnx" in capsys.readouterr().err, flag
  out.write_bytes(b"not a model")
  rc, _, err = _run(export_cli.main, [f"--model={teacher}", "--format=onnx", f"--out={out}"],
                    capsys)
  assert rc == 1 and "--overwrite" in _one_line(err)
  with pytest.raises(api.ModelError, match="not an ONNX model onnxruntime can run"):
    askd_jax.load(out)
  import onnx
  from onnx import TensorProto, helper
  g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
  onnx.save(helper.make_model(g), tmp_path / "other.onnx")
  with pytest.raises(api.ModelError, match="without askd_jax's metadata.*--format=onnx"):
    askd_jax.load(tmp_path / "other.onnx")


def _tinted_photos(n, size):
  """n real ORL photos (several people), tinted so that the channel order matters."""
  photos = [orl.to_square(orl.read_photo(1 + 3 * i, 1 + i % 10), size) for i in range(n)]
  tint = np.array([1.0, 0.75, 0.5], np.float32)
  return (np.stack(photos).astype(np.float32) * tint).astype(np.uint8)


def test_official_r50_onnx(tmp_path, capsys):
  """A random official-format iResNet50-CBAM (112 px, BGR as the official code) converted
  with --channel_order=bgr: its ONNX file takes BGR (the metadata says so) and gives the
  JAX model's embeddings at batch 1 and 7."""
  torch = pytest.importorskip("torch", reason="writing .ckpt files needs torch (optional)")
  from askd_jax.tools import convert
  from askd_jax.tools import torch_reference as tr
  torch.manual_seed(0)
  net = tr.randomize_(tr.iresnet_cbam(50, input_size=112), seed=3).eval()
  torch.save({"iters": 10, "net_state_dict": net.state_dict()}, tmp_path / "last_net.ckpt")
  model_dir = tmp_path / "r50"
  assert convert.main([f"--net={tmp_path / 'last_net.ckpt'}", f"--out={model_dir}",
                       "--channel_order=bgr", "--input_size=112"]) == 0
  capsys.readouterr()
  photos = _tinted_photos(7, 112)
  np.save(tmp_path / "photos.npy", photos)
  _export(capsys, model_dir, tmp_path / "r50.onnx")
  jax_model = askd_jax.load(model_dir, batch_size=7)
  want = jax_model.embed(photos)
  swapped = jax_model.embed(photos[..., ::-1].copy())
  assert not _close(swapped, want)  # the channel order matters for these photos
  out, meta = _run_clean(tmp_path, {"r50": (tmp_path / "r50.onnx", tmp_path / "photos.npy")})
  _check_batches(out, "r50", want)
  m = meta["r50"]
  assert (m["input_size"], m["channel_order"], m["embedding_size"]) == ("112", "bgr", "1024")
  assert "unknown training resolution" in m["training_resolution"]
  assert "threshold" not in m and "no evaluation" in m["threshold_note"]
