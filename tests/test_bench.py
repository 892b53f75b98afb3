"""The throughput tool on a tiny model: rows, ratios and the markdown table."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from askd_jax.tools import bench

TINY = ["--width=0.125", "--stage_sizes=1,1,1,1", "--embedding_dim=32", "--classes=10",
        "--size=28", "--batch=4", "--steps=2", "--lr_sizes=7",
        "--tune_cpu=0"]  # in-process: leave pytest's allocator alone (tests/test_runtime.py)


def _check_rows(rows, impls, kinds):
  assert {(r["impl"], r["step"]) for r in rows} == {(i, k) for i in impls for k in kinds}
  for r in rows:
    assert r["batch"] == 4 and len(r["times"]) == 2
    assert r["step ms"] > 0 and r["img/s"] > 0 and r["JAX speed-up"] > 0
    assert isinstance(r["faults/step"], int) and r["faults/step"] >= 0
    assert abs(r["img/s"] - 4e3 / r["step ms"]) < 1e-6 * r["img/s"]
    assert r["GFLOP/img"] > 0
    assert r["MFU"] is None  # no peak FLOP/s is known for a CPU
  for r in rows:
    if r["impl"] == "jax":
      assert r["JAX speed-up"] == pytest.approx(1.0)
      assert r["compile s"] > 0
  # The A-SKD step also runs the teacher's forward: more FLOPs per image.
  fl = {r["step"]: r["GFLOP/img"] for r in rows if r["impl"] == "jax"}
  if len(kinds) == 2:
    assert fl["askd"] > fl["teacher"]


def _check_table(text, rows):
  header = next(l for l in text.splitlines() if l.startswith("| model"))
  assert [c.strip() for c in header.strip("|").split("|")] == list(bench.COLUMNS)
  body = [l for l in text.splitlines() if l.startswith("| iResNet")]
  assert len(body) == len(rows)
  col = bench.COLUMNS.index("JAX speed-up")
  for line in body:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[col]) > 0 and float(cells[bench.COLUMNS.index("img/s")]) > 0


def test_bench_jax_only(tmp_path, capsys):
  out = tmp_path / "docs" / "bench.md"
  res = bench.main(TINY + ["--torch=none", f"--out={out}"])
  _check_rows(res["rows"], ["jax"], ["teacher", "askd"])
  text = out.read_text()
  _check_table(text, res["rows"])
  assert "python -m askd_jax.tools.bench" in text and "jax 0." in text
  assert "tune_cpu off" in text
  assert text.strip() in capsys.readouterr().out
  res2 = bench.main(TINY + ["--torch=none", "--steps_kind=teacher", "--schedule=blocked",
                            f"--out={out}"])
  assert out.read_text().count("| model |") == 2  # appended, not overwritten
  assert "over the blocked timed steps" in res2["markdown"]
  assert [r["step"] for r in res2["rows"]] == ["teacher"]


def test_bench_with_torch(tmp_path):
  pytest.importorskip("torch", reason="the PyTorch side of the benchmark needs torch")
  res = bench.main(TINY + ["--torch=eager,channels_last", f"--out={tmp_path / 'b.md'}"])
  _check_rows(res["rows"], ["jax", "torch eager", "torch channels_last"], ["teacher", "askd"])
  _check_table(res["markdown"], res["rows"])
  jax_ms = {r["step"]: r["step ms"] for r in res["rows"] if r["impl"] == "jax"}
  for r in res["rows"]:  # the speed-up is the ratio of the medians
    assert r["JAX speed-up"] == pytest.approx(r["step ms"] / jax_ms[r["step"]])
  assert "torch 2." in res["markdown"]


@pytest.mark.parametrize("schedule,order", [
    ("interleaved", ["a", "b", "a", "b", "a", "b"]),  # warm-ups, then rounds of a, b
    ("blocked", ["a", "a", "a", "b", "b", "b"])])      # a's warm-up and steps, then b's
def test_schedules_call_order(schedule, order):
  calls = []
  runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  rec = bench.SCHEDULES[schedule](runners, 2)
  assert calls == order
  for k in ("wall", "cpu", "faults"):
    assert {name: len(r[k]) for name, r in rec.items()} == {"a": 2, "b": 2}
    assert all(v >= 0 for r in rec.values() for v in r[k])


def test_faults_per_step_are_counted():
  """A step that touches 64 MB of fresh memory faults its pages in (16k pages of 4 KiB)."""
  # A fresh anonymous mapping, not malloc (which keeps freed memory mapped once
  # `runtime.tune_cpu()` ran in this process) nor numpy (which asks for transparent huge
  # pages, 2 MiB per fault).
  def touch():
    with mmap.mmap(-1, 2 ** 26) as m:
      for i in range(0, 2 ** 26, 4096):
        m[i] = 1
  rec = bench.SCHEDULES["blocked"]({"touch": touch, "idle": lambda: None}, 2)
  assert min(rec["touch"]["faults"]) > 16384 * 0.9
  assert max(rec["idle"]["faults"]) < 1000


def test_bad_flags_are_refused():
  with pytest.raises(SystemExit):
    bench.parse_args(["--torch=tensorflow"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--size=8"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--schedule=random"])


def test_peak_flops_table():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert bench.peak_flops("NVIDIA H200", "float32") == 67e12
  assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
  assert bench.peak_flops("cpu", "float32") is None


def test_max_batch_fit():
  # 1 GB fixed + 0.5 GB per image: 80 GB holds 158 images.
  fit = bench.fit_max_batch({64: int(1e9 + 64 * 5e8), 128: int(1e9 + 128 * 5e8)})
  assert fit["bytes_per_image"] == pytest.approx(5e8)
  assert fit["max_batch_80gb"] == 158


def test_peak_bytes_of_a_compiled_function():
  f = jax.jit(lambda x: (x @ x.T).sum()).lower(jnp.ones((256, 64))).compile()
  assert bench.peak_bytes(f) >= 256 * 64 * 4  # at least its argument


def test_importable_without_ml_collections_and_tfds():
  code = ("import sys; sys.modules['ml_collections'] = None; "
          "sys.modules['tensorflow_datasets'] = None; sys.modules['tensorflow'] = None; "
          "import askd_jax.tools.bench as b; print(b.COLUMNS[0])")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "model"
