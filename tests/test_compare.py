"""The compare preset: ORL identity splits, all test pairs, a grid of runs and its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from askd_jax.data import orl

from conftest import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_identity_splits_are_disjoint_and_cover_everyone():
  tests = []
  for k in range(4):
    train, test = orl.identity_split(k, 4)
    assert len(train) == 30 and len(test) == 10 and not set(train) & set(test)
    assert set(train) | set(test) == set(range(1, 41))
    tests.append(set(test))
  assert set().union(*tests) == set(range(1, 41))  # every person is tested exactly once
  assert orl.identity_split(2, 4)[1].tolist() == orl.identity_split(2, 4)[1].tolist()
  with pytest.raises(ValueError, match=r"config.data.split=4 must be -1 .* \[0, 4\)"):
    orl.identity_split(4, 4)
  with pytest.raises(ValueError, match="config.data.num_splits=1"):
    orl.identity_split(0, 1)


def test_all_pairs_count():
  # 10 people x 10 photos: 10 * C(10, 2) = 450 genuine pairs, 450 of the 4500 impostor pairs
  assert orl.all_pairs_count(np.repeat(np.arange(10), 10)) == 900
  assert orl.all_pairs_count(np.repeat(np.arange(12), 10)) == 1080  # the demo's 12 people


def test_load_demo_split_records_and_pairs(tmp_path):
  d = orl.load_demo(str(tmp_path), image_size=28, num_pairs=0, split=1, num_splits=4)
  train_people, test_people = orl.identity_split(1, 4)
  assert len(d["train"]) == 300 and d["num_classes"] == 30
  assert sorted(set(d["test_person"].tolist())) == test_people.tolist()
  recs = [d["train"][i] for i in range(len(d["train"]))]
  assert sorted({int(r["person"]) for r in recs}) == train_people.tolist()
  assert sorted({int(r["label"]) for r in recs}) == list(range(30))
  r = recs[37]  # a record's pixels are its own photo
  np.testing.assert_array_equal(
      r["image"], orl.to_square(orl.read_photo(int(r["person"]), int(r["photo"])), 28))
  p = d["pairs"]
  assert len(p["issame"]) == 900 and p["issame"].sum() == 450
  genuine = {(int(a), int(b)) for a, b, s in zip(p["idx1"], p["idx2"], p["issame"]) if s}
  labels = d["test_labels"]
  assert genuine == {(i, j) for i in range(100) for j in range(i + 1, 100)
                     if labels[i] == labels[j]}  # every genuine pair, once
  assert np.all(labels[p["idx1"]][~p["issame"]] != labels[p["idx2"]][~p["issame"]])


TINY = ["--config.data.image_size=28", "--config.model.width=0.125", "--config.model.embedding_dim=32",
        "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.student.sizes=7,", "--config.student.methods=none,askd",
        "--config.grid.splits=0,1", "--config.grid.seeds=3"]


def test_grid_runs_each_split_and_reports_paired_differences(tmp_path):
  """One command: a run per (split, seed) in its own workdir, then one report over them;
  running it again trains nothing and writes the same numbers."""
  wd = tmp_path / "cmp"
  cmd = [sys.executable, "-m", "askd_jax.main", "--config=configs/facerec.py:compare",
         f"--workdir={wd}", f"--config.data.data_dir={tmp_path / 'tfds'}",
         f"--config.jax_cache_dir={tmp_path / 'xla'}", *TINY]  # split 1 reuses split 0's programs
  r = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=3000)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for k in (0, 1):
    run = json.loads((wd / f"split{k}_seed3" / "config.json").read_text())["config"]
    assert (run["data"]["split"], run["seed"], "grid" in run) == (k, 3, False)
    rows = json.loads((wd / f"split{k}_seed3" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"teacher", "none", "askd"}
    assert all(0 <= r["tar_far1e-2"] <= 1 for r in rows)
  summary = json.loads((wd / "results.json").read_text())
  assert len(summary["runs"]) == 2
  d = next(x for x in summary["diffs"] if x["method"] == "askd" and x["metric"] == "accuracy")
  accs = {}
  for k in (0, 1):
    rows = json.loads((wd / f"split{k}_seed3" / "results.json").read_text())["rows"]
    accs[k] = {r["method"]: r["accuracy"] for r in rows if r["eval_resolution"] == "7"}
  assert np.isclose(d["mean"], np.mean([accs[k]["askd"] - accs[k]["none"] for k in (0, 1)]))
  md = (wd / "results.md").read_text()
  assert "paired difference to Student, no distillation" in md and "split0_seed3" in md
  ckpts = sorted(str(p.relative_to(wd)) for p in wd.glob("*/*/checkpoints/*"))
  assert len(ckpts) == 6  # 2 runs x (teacher + 2 students)
  mtimes = [os.path.getmtime(wd / p) for p in ckpts]
  again = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [os.path.getmtime(wd / p) for p in ckpts] == mtimes  # nothing trained again
  assert json.loads((wd / "results.json").read_text())["cells"] == summary["cells"]


def test_run_grid_orders_runs_and_reports_over_them(tmp_path, capsys):
  """askd_jax.compare.run_grid with a stand-in for askd_jax.experiment.run (no training): one
  sub-config per (split, seed), seed-major, without the grid block; the report pairs within
  runs; an override spelled '0,2' works."""
  import importlib.util
  from askd_jax import compare
  spec = importlib.util.spec_from_file_location("facerec_cfg", os.path.join(ROOT, "configs",
                                                                           "facerec.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("compare")
  cfg.grid.splits = ("0,2",)
  cfg.grid.seeds = (5, 6)
  seen = []

  def fake_run(sub, workdir, overwrite):
    seen.append((sub.data.split, sub.seed, "grid" in sub, os.path.basename(workdir)))
    os.makedirs(workdir)
    base = 0.8 + 0.05 * sub.data.split + 0.01 * sub.seed
    rows = [{"method": m, "eval_resolution": "7", "set": "orl_test", "accuracy": base + off,
             "std": 0.0, "tar_far1e-2": 0.5} for m, off in (("none", 0.0), ("askd", 0.01))]
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"meta": {"elapsed_s": 60.0}, "rows": rows}, f)

  md = compare.run_grid(cfg, str(tmp_path), False, fake_run)
  assert seen == [(0, 5, False, "split0_seed5"), (2, 5, False, "split2_seed5"),
                  (0, 6, False, "split0_seed6"), (2, 6, False, "split2_seed6")]
  summary = json.loads((tmp_path / "results.json").read_text())
  d = next(x for x in summary["diffs"] if x["method"] == "askd" and x["metric"] == "accuracy")
  # every run +1 point: no spread, so no evidence beyond the sign-flip test's 2/16
  assert d["n"] == 4 and np.isclose(d["mean"], 0.01) and np.isclose(d["p_signflip"], 0.125)
  assert not d["significant"] and "+1.00 (all 4 runs equal)" in md
  assert "runs' own times (each its last invocation): 4.0 min" in md
  assert (tmp_path / "results.md").read_text() == md
  cfg.grid.seeds = ("x",)
  with pytest.raises(ValueError, match=r"config.grid.seeds=\('x',\) must be integers"):
    compare.run_grid(cfg, str(tmp_path), False, fake_run)
