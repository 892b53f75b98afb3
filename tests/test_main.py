"""The CLI end to end on a tiny run: stages, evaluation, report, resume, evaluate-only."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import TINY_FACEREC, run_main, tiny_facerec_cfg


def _main(workdir, *extra, data_dir):
  return run_main(workdir, *TINY_FACEREC, f"--config.data.data_dir={data_dir}", *extra)


@pytest.fixture
def tiny_run(tiny_facerec_run, tmp_path):
  """A private copy of the session's tiny run (conftest.py), for tests that run the CLI in it
  again: the shared one stays as it was for the other tests."""
  src, data, stdout = tiny_facerec_run
  wd = tmp_path / "wd"
  shutil.copytree(src, wd)
  return wd, data, stdout


def test_stages_report_and_logs(tiny_facerec_run):
  wd, _, stdout = tiny_facerec_run
  for stage in ("teacher", "student_none_7px", "student_askd_7px"):
    assert os.path.exists(wd / stage / "DONE")
    spec = json.loads((wd / stage / "model.json").read_text())
    assert spec["arch"] == "iresnet_cbam" and spec["trained_steps"] == 4
  res = json.loads((wd / "results.json").read_text())
  got = {(row["method"], row["eval_resolution"]) for row in res["rows"]}
  assert got == {("teacher", "HR"), ("teacher", "7"), ("none", "7"), ("askd", "7")}
  for row in res["rows"]:
    assert 0.0 <= row["accuracy"] <= 1.0 and row["std"] >= 0.0
  md = (wd / "results.md").read_text()
  assert "| Student, A-SKD |" in md and "| Teacher (HR-trained) |" in md
  assert "Student, A-SKD" in stdout  # the table is printed
  assert (wd / "results.png").stat().st_size > 1000
  events = [f for _, _, fs in os.walk(wd / "tensorboard") for f in fs if "tfevents" in f]
  assert len(events) == 3
  student = json.loads((wd / "student_askd_7px" / "model.json").read_text())
  assert student["teacher"]["path"] == str(wd / "teacher")


def test_rerun_in_process_skips_finished_stages(tiny_run):
  """experiment.run, the function behind the CLI, called in this process with the CLI run's
  config: the workdir guard takes it as the same run, no stage trains again, and it returns
  (and writes again) the rows the CLI wrote."""
  from askd_jax import experiment, stop
  wd, data, _ = tiny_run
  before = json.loads((wd / "results.json").read_text())["rows"]
  phases = []
  listener = lambda phase, detail: phases.append(phase)
  stop.listeners.append(listener)
  try:
    rows = experiment.run(tiny_facerec_cfg(data), str(wd))
  finally:
    stop.listeners.remove(listener)
  assert {"guard", "data", "stage", "report"} <= set(phases)
  assert not {"build", "compile", "step"} & set(phases), phases  # every stage was finished
  assert {(r["stage"], r["eval_resolution"]) for r in rows} == {
      ("teacher", "HR"), ("teacher", "7"), ("student_none_7px", "7"), ("student_askd_7px", "7")}
  assert json.loads(json.dumps(rows)) == before
  assert json.loads((wd / "results.json").read_text())["rows"] == before


def test_evaluate_only(tiny_run):
  wd, data, _ = tiny_run
  r = _main(wd, f"--evaluate={wd / 'student_askd_7px'}", "--eval_sizes=7", data_dir=data)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout[r.stdout.index("{"):])
  cached = json.loads((wd / "results.json").read_text())["rows"]
  want = [x for x in cached if x["stage"] == "student_askd_7px"][0]
  assert out["7"]["orl_test"]["accuracy"] == pytest.approx(want["accuracy"])
