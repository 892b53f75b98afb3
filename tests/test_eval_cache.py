"""What an evaluation computes and what STAGE/eval.json keeps: float32 whatever the training
dtype, one size at a time, and a cache keyed on the weights (BatchNorm statistics included),
the config, the prepared data's content and the dtype, with evaluations side by side.

Driven in process through `experiment.evaluate` (what `python -m askd_jax.main --evaluate`
calls) on copies of the session's tiny CLI run (tests/conftest.py: 28 px ORL, width 0.125).
"""
from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest

import askd_jax
from askd_jax import evalfile, experiment
from conftest import tiny_facerec_cfg

pytestmark = pytest.mark.slow


def _entries(stage_dir):
  return evalfile.read(os.path.join(stage_dir, evalfile.FILE))["evaluations"]


def _copy(src, dest, keep_eval=False):
  shutil.copytree(src, dest)
  if not keep_eval and os.path.exists(os.path.join(dest, evalfile.FILE)):
    os.remove(os.path.join(dest, evalfile.FILE))
  return str(dest)


def test_bfloat16_trained_stage_is_evaluated_in_float32(tiny_facerec_run, tmp_path):
  """A stage trained with --config.dtype=bfloat16 (float32 weights, bfloat16 activations in
  training) is evaluated in float32: its eval.json equals a float32 run's evaluation of
  the same weights, to the last digit. config.eval.dtype=train evaluates in bfloat16, which
  changes the numbers on this fixture (so the equality is not vacuous), and is kept beside
  the float32 entry. Failed before the fix (evaluated in config.dtype): the accuracy, std
  and threshold differed from the float32 ones."""
  wd, data, _ = tiny_facerec_run
  want = experiment.evaluate(tiny_facerec_cfg(data), _copy(wd / "teacher", tmp_path / "f32"))
  want = want["HR"]
  d = _copy(wd / "teacher", tmp_path / "teacher")
  cfg = tiny_facerec_cfg(data)
  cfg.dtype = "bfloat16"
  got = experiment.evaluate(cfg, d)["HR"]
  assert got == want
  cfg.eval.dtype = "train"
  in_bf16 = experiment.evaluate(cfg, d)["HR"]
  assert in_bf16 != want
  assert [(e["dtype"], e["results"]["HR"]) for e in _entries(d)] == [
      ("float32", want), ("bfloat16", in_bf16)]


def test_eval_sizes_evaluates_each_size_on_its_own(tiny_facerec_run, tmp_path):
  """--eval_sizes=7,14 (experiment.evaluate(cfg, d, (7, 14))) gives one result per size,
  and the 7 px one is the run's own 7 px evaluation. Failed before the fix: one result
  keyed "7/14" in which each image drew one of the two sizes."""
  wd, data, _ = tiny_facerec_run
  cfg = tiny_facerec_cfg(data)
  want = experiment.evaluate(cfg, _copy(wd / "student_askd_7px", tmp_path / "s7"), (7,))["7"]
  d = _copy(wd / "student_askd_7px", tmp_path / "student")
  got = experiment.evaluate(cfg, d, (7, 14))
  assert sorted(got) == ["14", "7"]
  assert got["7"] == want
  assert got["14"] != got["7"]


def _tinyface_copy(root, data_dir, rotate: int):
  """A prepared TinyFace-layout set of 3 identities and 2 distractors (28 px): the probe of
  identity i is, pixel for pixel, the gallery image of identity i + rotate (mod 3); rotate
  0 gives rank-1 1.0, rotate 1 gives 0.0 with any model that tells images apart."""
  from askd_jax.data import faces, fixtures
  rng = np.random.default_rng(0)
  gallery = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(3)]
  other = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)]
  layout = {"Probe": ["1_0.png", "2_0.png", "3_0.png"],
            "Gallery_Match": ["1_1.png", "2_1.png", "3_1.png"],
            "Gallery_Distractor": ["x_0.png", "x_1.png"]}
  probes = [gallery[(i + rotate) % 3] for i in range(3)]
  fixtures.write_tinyface_tree(str(root), probes + gallery + other, layout)
  faces.prepare("tinyface", str(root), str(data_dir))
  return str(data_dir)


def test_cache_is_keyed_on_the_prepared_data(tiny_facerec_run, tmp_path):
  """One model, two prepared copies of a TinyFace-layout set with different content (same
  config but config.data.data_dir): the second evaluation gives the second set's numbers
  (equal to a fresh evaluation on it), not the first set's cached ones, and both stay in
  eval.json side by side. Failed before the fix: the second evaluation returned the first
  set's rank-1 of 1.0 (the cache ignored where the data came from)."""
  wd, data, _ = tiny_facerec_run
  sets = [_tinyface_copy(tmp_path / f"manual{r}", tmp_path / f"tfds{r}", r) for r in (0, 1)]

  def cfg(data_dir):
    c = tiny_facerec_cfg(data_dir)
    c.data.name, c.data.verification, c.data.tinyface = "insightface", (), True
    return c
  d = _copy(wd / "teacher", tmp_path / "teacher", keep_eval=True)
  first = experiment.evaluate(cfg(sets[0]), d)["HR"]
  second = experiment.evaluate(cfg(sets[1]), d)["HR"]
  assert first["tinyface_rank1"]["accuracy"] == 1.0
  assert second["tinyface_rank1"]["accuracy"] == 0.0
  fresh = experiment.evaluate(cfg(sets[1]), _copy(wd / "teacher", tmp_path / "fresh"))["HR"]
  assert second == fresh
  assert [e["results"]["HR"] for e in _entries(d)][-2:] == [first, second]
  assert len(_entries(d)) == 3  # the run's own ORL evaluation is kept too


def test_replaced_weights_do_not_serve_old_numbers(tiny_facerec_run, tmp_path):
  """Two models in one directory: the teacher's BatchNorm statistics rewritten in place
  (variables/ written over it, as `tools.convert --overwrite` does; the parameters and their
  hash unchanged) are evaluated again: the numbers equal a fresh evaluation of the new
  weights, the old entries are dropped, and askd_jax.load's threshold is the new one.
  Failed before the fix: the old numbers came back from the cache (its key held no
  weights)."""
  from askd_jax.train.checkpoint import export_model, load_model
  wd, data, _ = tiny_facerec_run
  cfg = tiny_facerec_cfg(data)
  d = _copy(wd / "teacher", tmp_path / "teacher", keep_eval=True)
  old = experiment.evaluate(cfg, d)["HR"]
  variables, spec = load_model(d)
  import jax
  shifted = jax.tree_util.tree_map_with_path(  # the running means, by half a unit
      lambda p, x: x + 0.5 if "mean" in jax.tree_util.keystr(p) else x, variables["batch_stats"])
  export_model(d, {"params": variables["params"], "batch_stats": shifted}, spec, overwrite=True)
  new = experiment.evaluate(cfg, d)["HR"]
  assert new != old
  fresh = experiment.evaluate(cfg, _copy(d, tmp_path / "fresh"))["HR"]
  assert new == fresh
  assert [e["results"] for e in _entries(d)] == [{"HR": new}]
  assert askd_jax.load(d).threshold().value == new["orl_test"]["threshold"]


def test_thresholds_come_from_the_training_configs_evaluation(tiny_facerec_run, tmp_path,
                                                              capsys):
  """The teacher of a run evaluated again under another config (other verification pairs)
  keeps both evaluations; askd_jax.load and tools.verify take the threshold from the
  evaluation under the config the model was trained with, or from the one named. Failed
  before the fix: the second evaluation replaced eval.json, thresholds included."""
  wd, data, _ = tiny_facerec_run
  w = tmp_path / "wd"
  shutil.copytree(wd, w)
  own = _entries(w / "teacher")[0]["results"]["HR"]["orl_test"]
  cfg = tiny_facerec_cfg(data)
  cfg.data.num_pairs = 100
  other = experiment.evaluate(cfg, str(w / "teacher"))["HR"]["orl_test"]
  assert other["threshold"] != own["threshold"]
  entries = _entries(w / "teacher")
  assert [e["results"]["HR"]["orl_test"] for e in entries] == [own, other]
  assert askd_jax.load(w / "teacher").threshold().value == own["threshold"]
  named = askd_jax.load(w / "teacher", evaluation=entries[1]["key"][:8])
  assert named.threshold().value == other["threshold"]
  with pytest.raises(askd_jax.api.ModelError, match="evaluation=nope: .*no evaluation named"):
    askd_jax.load(w / "teacher", evaluation="nope")
  from PIL import Image
  from askd_jax.tools import verify
  faces = [str(tmp_path / f"{i}.png") for i in range(2)]
  for i, f in enumerate(faces):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28, 3), np.uint8)).save(f)
  for name, want in (([], own), ([f"--evaluation={entries[1]['key']}"], other)):
    assert verify.main([f"--model={w / 'teacher'}", *faces, *name]) == 0
    assert (f"(threshold {want['threshold']:.4f} chosen by the verification on orl_test at HR, "
            f"accuracy {want['accuracy']:.4f})") in capsys.readouterr().out


class _DiskFull:
  """A file whose first write lands partly and then fails as a full disk does (as root too,
  where a read-only directory does not stop a write)."""

  def __init__(self, path, mode):
    self.f = builtins.open(path, mode)

  def write(self, s):
    self.f.write(s[:7])
    self.f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()


@pytest.mark.parametrize("had_cache", [False, True])
def test_unwritable_eval_json_warns_and_leaves_nothing_partial(tiny_facerec_run, tmp_path,
                                                              monkeypatch, caplog, had_cache):
  """Writing eval.json fails half-way (a full disk: works as root, unlike a chmod): the
  results are still returned, one warning names the file and the reason, and nothing
  partial is left: no eval.json.tmp, no eval.json, or the previous one unchanged. Checked
  by hand: without write_json's clean-up the partial eval.json.tmp stays and this fails;
  without evaluate_stage's except, the OSError ends the evaluation."""
  from askd_jax import workdir as workdir_lib
  wd, data, _ = tiny_facerec_run
  d = _copy(wd / "teacher", tmp_path / "teacher")
  cfg = tiny_facerec_cfg(data)
  cfg.data.num_pairs = 100  # not cached: an evaluation that must write
  if had_cache:
    experiment.evaluate(tiny_facerec_cfg(data), d)
  before = sorted(os.listdir(d))
  old = open(os.path.join(d, "eval.json"), "rb").read() if had_cache else None
  written = []

  def fake_open(path, mode="r", *a, **k):
    if str(path).endswith(".tmp") and "w" in mode:
      written.append(path)
      return _DiskFull(path, mode)
    return builtins.open(path, mode, *a, **k)
  monkeypatch.setattr(workdir_lib, "open", fake_open, raising=False)
  with caplog.at_level(logging.WARNING, logger="askd_jax"):
    got = experiment.evaluate(cfg, d)
  assert 0.0 <= got["HR"]["orl_test"]["accuracy"] <= 1.0
  assert written == [os.path.join(d, "eval.json.tmp")]  # a partial file was written...
  assert sorted(os.listdir(d)) == before  # ...and removed
  if had_cache:
    assert open(os.path.join(d, "eval.json"), "rb").read() == old
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name.startswith("askd_jax")]
  assert warnings == [f"could not cache the results in {d}/eval.json (No space left on device)"]


def test_corrupt_or_wrongly_typed_eval_json_is_an_empty_cache(tmp_path):
  """evalfile.read: a missing, cut-short, null, list-typed or older-format file, or one
  written for other weights, is an empty cache, never an error."""
  p = str(tmp_path / "eval.json")
  assert evalfile.read(p, "w1") == evalfile.empty("w1")
  good = {"format": evalfile.FORMAT, "weights": "w1", "evaluations": [
      {"key": "k", "config": "c", "data": "d", "dtype": "float32", "results": {"HR": {}}}]}
  for text in ('{"format": 2, "weig', "null", "[]", json.dumps({"HR": {"lfw": {}}, "_eval": "x"}),
               json.dumps(dict(good, evaluations={"k": {}})),
               json.dumps(dict(good, evaluations=[{"key": "k", "results": []}]))):
    with open(p, "w") as f:
      f.write(text)
    assert evalfile.read(p, "w1")["evaluations"] == [], text
  with open(p, "w") as f:
    json.dump(good, f)
  assert evalfile.read(p, "w1") == good
  assert evalfile.read(p, "w2") == evalfile.empty("w2")
