"""The notebooks and the attention CLI, run end to end on a tiny trained run.

The run (conftest.py's `tiny_facerec_run`: 28 px ORL, width 0.125, 4 steps per stage, one
7 px student per method) is trained once per test session; both notebooks are then executed
headless with nbclient on a kernel of this very interpreter (a kernelspec written into a
temp dir, so a clean venv with ipykernel installed is enough), the workdir injected
papermill-style after the cell tagged `parameters`.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("attention_maps.ipynb", "results.ipynb", "use_a_model.ipynb")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_facerec_run):
  """The session's tiny CLI run (conftest.py), shared with tests/test_main.py."""
  workdir = str(tiny_facerec_run[0])
  for stage in ("teacher", "student_none_7px", "student_askd_7px"):
    assert os.path.exists(os.path.join(workdir, stage, "DONE")), stage
  return workdir


# --- the stored notebooks ----------------------------------------------------------------

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_stored_clean(name):
  """Stored without outputs, with one parameters cell and a Colab install cell first."""
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs"
  assert "google.colab" in code[0].source and "pip" in code[0].source
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def _kernel(tmp_path):
  """A kernelspec that starts this interpreter, in a private directory."""
  pytest.importorskip("ipykernel")
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  kdir = tmp_path / "kernels" / "askd-test"
  kdir.mkdir(parents=True)
  (kdir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "askd test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="askd-test", kernel_spec_manager=ksm)


def _inject(nb, params: dict):
  """papermill-style: a cell overriding the parameters, right after the tagged one."""
  import nbformat
  i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]},
                                   id="injected-parameters")
  nb.cells.insert(i + 1, cell)


def _execute(name, params, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  _inject(nb, params)
  client = nbclient.NotebookClient(nb, km=_kernel(tmp_path), timeout=900,
                                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()
  return nb


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_attention_notebook_runs(tiny_run, tmp_path):
  nb = _execute("attention_maps.ipynb", {"WORKDIR": tiny_run, "NUM_IMAGES": 2,
                                         "TRAIN_IF_MISSING": False}, tmp_path)
  outs = _outputs(nb)
  assert not [o for o in outs if o.output_type == "error"]
  pngs = [o for o in outs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2 + 1  # two attention grids, one similarity plot
  md = "".join(o["data"]["text/markdown"] for o in outs if "text/markdown" in o.get("data", {}))
  assert "Student, A-SKD" in md  # the run's results table
  assert "A-SKD 7px | channel" in md and "no distillation 7px | spatial" in md


def test_results_notebook_runs(tiny_run, tmp_path):
  nb = _execute("results.ipynb", {"RUNS": [tiny_run], "TRAIN_IF_MISSING": False}, tmp_path)
  outs = _outputs(nb)
  assert not [o for o in outs if o.output_type == "error"]
  pngs = [o for o in outs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # accuracy vs resolution, ROC
  md = "".join(o["data"]["text/markdown"] for o in outs if "text/markdown" in o.get("data", {}))
  # teacher at HR and 7 px, both students at 7 px: four ROC curves, each with an AUC in [0, 1]
  aucs = [float(line.split("|")[-2]) for line in md.splitlines() if line.startswith(f"| {tiny_run}")]
  assert len(aucs) == 4 and all(0.0 <= a <= 1.0 for a in aucs)


def test_use_a_model_notebook_runs(tiny_run, tmp_path):
  """Two photos of one ORL person and one of another, embedded with askd_jax.load."""
  import askd_jax
  from askd_jax.data import orl
  nb = _execute("use_a_model.ipynb", {"WORKDIR": tiny_run, "PERSON": 3, "OTHER": 17}, tmp_path)
  outs = _outputs(nb)
  assert not [o for o in outs if o.output_type == "error"]
  assert len([o for o in outs if "image/png" in o.get("data", {})]) == 1
  text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
  model = askd_jax.load(os.path.join(tiny_run, "teacher"))
  s = model.input_size
  photos = ((3, 1), (3, 2), (17, 1))
  emb = model.embed([orl.to_square(orl.read_photo(p, k), s) for p, k in photos])
  assert f"same person:      {model.similarity(emb[0], emb[1]):.4f}" in text
  assert f"different people: {model.similarity(emb[0], emb[2]):.4f}" in text


# --- the CLI -------------------------------------------------------------------------------

def test_cli_writes_figures_and_similarities(tiny_run, tmp_path):
  from askd_jax.tools import attention as cli
  out = tmp_path / "att"
  assert cli.main([f"--workdir={tiny_run}", f"--out={out}", "--num_images=2"]) == 0
  for f in ("attention_0.png", "attention_1.png", "similarity.png"):
    data = (out / f).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  assert not (out / "attention_2.png").exists()
  sims = json.loads((out / "similarity.json").read_text())
  with open(os.path.join(tiny_run, "teacher", "model.json")) as f:
    spec = json.load(f)
  assert sims["num_blocks"] == sum(spec["stage_sizes"])  # one CBAM block per residual unit
  assert sims["num_images"] == 120 and sims["image_set"] == "orl_test"
  assert set(sims["students"]) == {"student_none_7px", "student_askd_7px"}
  for v in sims["students"].values():
    for kind in ("channel", "spatial"):
      vals = np.array(v[kind])
      assert vals.shape == (sims["num_blocks"],)
      assert np.all(np.isfinite(vals)) and np.all(np.abs(vals) <= 1.0 + 1e-9)
  cmp = sims["askd_vs_none"]["7"]["channel"]
  a = np.array(sims["students"]["student_askd_7px"]["channel"])
  b = np.array(sims["students"]["student_none_7px"]["channel"])
  assert cmp["higher_blocks"] == int(np.sum(a > b))


def test_cli_user_images_and_bad_input(tiny_run, tmp_path, capsys):
  from PIL import Image
  from askd_jax.tools import attention as cli
  faces = tmp_path / "faces"
  faces.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):  # any size: resized to the model input
    Image.fromarray(rng.integers(0, 255, (40, 33, 3), dtype=np.uint8)).save(faces / f"{i}.png")
  out = tmp_path / "att"
  assert cli.main([f"--workdir={tiny_run}", f"--out={out}", f"--images={faces}",
                   "--num_images=5", "--max_eval_images=16"]) == 0
  assert sorted(p.name for p in out.glob("attention_*.png")) == [f"attention_{i}.png" for i in range(3)]
  assert json.loads((out / "similarity.json").read_text())["num_images"] == 16
  capsys.readouterr()
  assert cli.main([f"--workdir={tiny_run}", f"--out={out}", "--size=14"]) == 1
  assert "--size=14" in capsys.readouterr().err
  assert cli.main([f"--workdir={tmp_path / 'nope'}", f"--out={out}"]) == 1
  assert "config.json" in capsys.readouterr().err
