"""`python -m askd_jax.tools.rehearse`: each paper preset at full size, from files in the real
formats through `askd_jax.data.prepare` and the preset's own `askd_jax.main` command, with a
SIGKILLed and resumed A-SKD student that must end bit-identical to an uninterrupted one.

The three full-size rehearsals are slow on 2 CPU cores (imagenet ~10 min, widerface ~15 min,
casia with its three students much longer, cold), too slow for the default suite: they run
when ASKD_REHEARSAL=1 is set (`ASKD_REHEARSAL=1 python -m pytest -q tests/test_rehearse.py`),
and are skipped otherwise. The default suite runs each preset's `--quick --small` rehearsal
(one student, no reference run, one block per stage: every seam from the file formats to the
tables, not the full-size networks; docs/scaling.md) and the cheap tests, which check that
the identity check can fail, that the tables read the loop's records and that --quick and
--small override only what they say.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from askd_jax.tools import rehearse
from conftest import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))

EXPECTED_SETS = {  # preset -> the killed student, the sets every stage is evaluated on
    "casia": ("student_askd_14px", {"lfw", "agedb_30", "cfp_fp"}),
    "imagenet": ("student_askd_112px", {"validation top-1", "validation top-5"}),
    "widerface": ("student_askd_40px", {"widerface_easy", "widerface_medium", "widerface_hard"}),
}


def test_compare_variables_finds_a_one_bit_difference():
  a = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)},
       "batch_stats": {"m": np.ones(2, np.float32)}}
  b = {"params": {"w": a["params"]["w"].copy(), "b": np.zeros(3)},
       "batch_stats": {"m": np.ones(2, np.float32)}}
  assert rehearse.compare_variables(a, b) == []
  b["params"]["w"].view(np.uint32)[1, 2] ^= 1  # the last bit of one float
  assert rehearse.compare_variables(a, b) == ["['params']['w']"]
  del b["batch_stats"]["m"]
  assert "['batch_stats']['m']" in rehearse.compare_variables(a, b)


def test_segments_split_processes_and_tables_read_them():
  events = [{"event": "compile", "step": 1, "seconds": 50.0},
            {"event": "save", "step": 1, "seconds": 2.0},
            {"event": "compile", "step": 2, "seconds": 5.0},  # the resumed process
            {"event": "end", "step": 3, "steps_run": 2, "timed_steps": 1, "timed_seconds": 4.0,
             "batch_size": 2, "max_rss_bytes": 2 ** 30},
            {"event": "save", "step": 3, "seconds": 1.0},
            {"event": "eval", "resolution": "14", "seconds": 9.0, "sets": {"lfw": 3.0}}]
  segs = rehearse._segments(events)
  assert [s["compile"]["seconds"] for s in segs] == [50.0, 5.0]
  assert segs[0]["end"] is None and [e["step"] for e in segs[1]["saves"]] == [3]
  report = {"preset": "casia", "steps": 3, "batch": 2, "eval_batch": 2, "command": "x",
            "runs": {}, "stages": {"student_askd_14px": {"checkpoint_bytes": 2 ** 20, "rows": [
                dict(segs[0], run="first (SIGKILL)"), dict(segs[1], run="resumed")]}}}
  md = rehearse.format_report(report)
  assert "| first (SIGKILL) | 1 | - | 50.0 | - | 2.00 x1 | cached |" in md
  assert "| resumed | 2 | 0.50 | 5.0 | 1.00 | 1.00 x1 | 14: lfw 3.0 (all 9.0) |" in md


def test_quick_and_small_change_only_run_length_and_model_size(tmp_path):
  """--small touches config.model only; --quick only the students and their evaluation; the
  preset's command and run-length overrides stay as they are."""
  for preset in rehearse.PRESETS:
    args = (preset, str(tmp_path), str(tmp_path / "w"), 2, 2, 2, None, str(tmp_path / "c"))
    plain = rehearse.main_command(*args)
    both = rehearse.main_command(*args, quick=True, small=True)
    assert both[:len(plain)] == plain
    added = both[len(plain):]
    assert added == rehearse.QUICK[preset] + rehearse.SMALL[preset]
    assert all(a.startswith("--config.model.") for a in rehearse.SMALL[preset])
    assert all(a.startswith("--config.student.") for a in rehearse.QUICK[preset])
  assert "--config.student.sizes=14," in rehearse.main_command("casia", *args[1:], quick=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ASKD_REHEARSAL") != "1",
                    reason="full-size rehearsal: set ASKD_REHEARSAL=1 to run it")
@pytest.mark.parametrize("preset", ["casia", "imagenet", "widerface"])
def test_rehearsal_of_each_preset_resumes_bit_identically(preset, tmp_path):
  out = tmp_path / preset
  r = subprocess.run([sys.executable, "-m", "askd_jax.tools.rehearse", f"--preset={preset}",
                      f"--out={out}", "--steps=2", "--batch=2", f"--jax_cache_dir={CACHE}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f"## {EXPECTED_SETS[preset][0]}" in r.stdout
  check_rehearsal(preset, out)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["casia", "imagenet", "widerface"])
def test_quick_small_rehearsal_of_each_preset_joins_the_seams(preset, tmp_path):
  """The default suite's rehearsal: --quick --small (one student, the teacher evaluated at HR,
  no reference run; one block per stage, fewer channels), from the real formats through
  prepare, the preset's command, SIGKILL, resume, every evaluation set and the tables."""
  out = tmp_path / preset
  r = subprocess.run([sys.executable, "-m", "askd_jax.tools.rehearse", f"--preset={preset}",
                      f"--out={out}", "--steps=2", "--batch=2", "--quick", "--small",
                      f"--jax_cache_dir={CACHE}"],
                     cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f"## {EXPECTED_SETS[preset][0]}" in r.stdout
  assert "resumed from step 1, trained to step 2 (no uninterrupted reference)" in r.stdout
  check_rehearsal(preset, out, quick=True)
  # The model-size overrides reached the model; the preset's input size and head did not move.
  spec = json.loads((out / "workdir" / "teacher" / "model.json").read_text())
  cfg = json.loads((out / "workdir" / "config.json").read_text())["config"]
  assert list(cfg["model"]["stage_sizes"]) == [1, 1, 1, 1]
  assert cfg["data"]["image_size"] == {"casia": 112, "imagenet": 224, "widerface": 640}[preset]
  if preset == "casia":
    assert spec["num_classes"] == 10572


def check_rehearsal(preset, out, quick=False):
  """The assertions on a finished rehearsal's OUT folder (quick: one student, the teacher
  evaluated at HR only, no reference run)."""
  out = pathlib.Path(out)
  rep = json.loads((out / "rehearsal.json").read_text())
  victim, sets = EXPECTED_SETS[preset]
  assert rep["killed"] == {"stage": victim, "after_checkpoint": 1, "resumed_from": 1,
                           "trained_steps": 2}
  if not quick:
    assert rep["resume_identical"] is True and rep["resume_differs"] == []
  else:
    assert "resume_identical" not in rep
  assert rep["runs"]["first (SIGKILL)"]["killed"]
  # The preset's model, trained and evaluated on every set at every stage.
  stages = set(rep["stages"])
  assert victim in stages and "teacher" in stages
  if quick:
    assert stages == {"teacher", victim}
  elif preset == "casia":
    assert stages == {"teacher", "student_askd_14px", "student_askd_28px", "student_askd_56px"}
  if preset == "casia":  # TinyFace: the tinyface preset's evaluation of the teacher at 24 px
    assert {k for k in rep["tinyface"]} == {f"tinyface_rank{k}" for k in (1, 5, 10, 20)}
  got = {}
  for row in rep["results"]:
    got.setdefault(row["stage"], set()).add(row["set"])
  assert got == {s: sets for s in stages}, got
  resolutions = {(row["stage"], row["eval_resolution"]) for row in rep["results"]}
  if quick:  # the teacher at HR, the student at its own size
    assert resolutions == {("teacher", "HR"), (victim, victim.split("_")[-1][:-2])}, resolutions
  for name, st in rep["stages"].items():
    ends = [row["end"] for row in st["rows"] if row["end"]]  # a resumed 1-step run times none
    if not (quick and name == victim):  # quick: the victim has no uninterrupted run
      assert any(e["timed_steps"] >= 1 and e["timed_seconds"] > 0 for e in ends), name
    assert st["checkpoint_bytes"] > 0
    evals = [e for row in st["rows"] for e in row["evals"]]
    assert evals, f"{name}: no evaluation recorded"
  # The killed student: trained to step 1 and saved, killed; resumed from 1 to 2.
  rows = rep["stages"][victim]["rows"]
  assert [row["run"] for row in rows] == ["first (SIGKILL)", "resumed"] + (
      [] if quick else ["reference (uninterrupted)"])
  assert rows[0]["end"] is None and [s["step"] for s in rows[0]["saves"]] == [1]
  assert rows[1]["end"]["steps_run"] == 1
  if not quick:
    assert rows[2]["end"]["steps_run"] == 2
  model = json.loads((out / "workdir" / victim / "model.json").read_text())
  assert model["resumed_from"] == 1 and model["trained_steps"] == 2


def test_tinyface_evaluation_uses_the_eval_batch(monkeypatch):
  """Found by the rehearsal: TinyFace embeddings ignored config.eval.batch_size and padded
  every call to 64 images (x2 with the flip), 14x the work for its 9 images. With the fix
  reverted (no batch= in FaceRecTask.evaluate's TinyFace loop) the calls see 64 and this fails."""
  from askd_jax.config_check import normalize
  from askd_jax.tasks.facerec import FaceRecTask
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import facerec as facerec_cfg  # pylint: disable=import-error
  cfg = facerec_cfg.get_config("tinyface")
  normalize(cfg)
  cfg.eval.batch_size = 3
  task = FaceRecTask(cfg)
  rng = np.random.default_rng(0)
  task._data = {"num_classes": 4, "verification": [], "tinyface": {
      "probe": {"image": rng.integers(0, 255, (4, 8, 8, 3), np.uint8), "label": np.arange(4)},
      "gallery": {"image": rng.integers(0, 255, (5, 8, 8, 3), np.uint8),
                  "label": np.array([0, 1, 2, 3, -100])}}}
  seen = []

  def fake_embed_fn(model, sizes=(), degrade_cfg=None):
    def embed(variables, images, key):
      seen.append(len(images))
      return images.reshape(len(images), -1)[:, :6].astype(np.float32)
    return embed
  monkeypatch.setattr(task, "embed_fn", fake_embed_fn)
  res = task.evaluate(None, None, (24,))
  assert seen and set(seen) == {3}
  assert res["tinyface_rank1"]["accuracy"] >= 0
