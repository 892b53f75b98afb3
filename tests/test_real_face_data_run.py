"""The paper presets' data path end to end: an insightface RecordIO set and an lfw.bin,
prepared with the real builders, trained and verified through `python -m askd_jax.main`."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

from askd_jax.data import faces, fixtures
from askd_jax.data.recordio import write_insightface_rec

from conftest import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(seed, label, size=28):
  return fixtures.encode_image(fixtures.identity_pixels(label, seed, size))


def test_casia_preset_trains_and_verifies_on_prepared_files(tmp_path):
  manual, data_dir, wd = tmp_path / "manual", tmp_path / "tfds", tmp_path / "wd"
  manual.mkdir()
  write_insightface_rec(str(manual / "train.rec"), str(manual / "train.idx"),
                        [(_png(i, i % 4), i % 4) for i in range(32)])
  pairs = [(_png(100 + i, i % 4), _png(200 + i, (i + (i % 2)) % 4)) for i in range(20)]
  with open(manual / "lfw.bin", "wb") as f:
    pickle.dump(([b for p in pairs for b in p], [i % 2 == 0 for i in range(20)]), f)
  faces.prepare("casia", str(manual), str(data_dir))
  faces.prepare("lfw", str(manual), str(data_dir))

  cmd = [sys.executable, "-m", "askd_jax.main", "--config=configs/facerec.py:casia",
         f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
         f"--config.data.manual_dir={manual}", "--config.data.verification=lfw,",
         "--config.data.image_size=28", "--config.model.width=0.125",
         "--config.model.stage_sizes=1,1,1,1", "--config.model.embedding_dim=16",
         "--config.train.steps=2", "--config.train.batch_size=8", "--config.student.sizes=7,",
         "--config.student.methods=askd,", "--config.jax_cache_dir="]
  r = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rows = json.loads((wd / "results.json").read_text())["rows"]
  assert {(x["method"], x["eval_resolution"], x["set"]) for x in rows} == {
      ("teacher", "HR", "lfw"), ("teacher", "7", "lfw"), ("askd", "7", "lfw")}
  spec = json.loads((wd / "teacher" / "model.json").read_text())
  assert spec["num_classes"] == 4
