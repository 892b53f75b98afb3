"""Where the step's time goes: op categories, trace parsing and both frameworks' profilers."""
from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.tools import bench, step_profile


@pytest.mark.parametrize("name,cat", [
    # XLA:GPU / cuDNN / cuBLAS kernel names
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_wgrad_implicit_gemm_indexed_bf16", "convolution"),
    ("cudnn::bn_fw_tr_1C11_kernel_NCHW", "normalisation"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("loop_convert_fusion", "elementwise"),  # a convert is not a convolution
    ("loop_multiply_fusion", "elementwise"),
    ("input_reduce_fusion", "reduction"),
    ("transpose_copy_fusion", "copy/transpose"),
    # XLA:CPU op names
    ("convolution", "convolution"), ("dot", "matmul"), ("add_select_fusion", "elementwise"),
    # PyTorch operator and inductor kernel names
    ("aten::mkldnn_convolution", "convolution"), ("aten::native_batch_norm_backward",
                                                  "normalisation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "elementwise"),
    ("triton_red_fused_sum_3", "reduction"), ("triton_poi_fused_add_mul_7", "elementwise"),
    ("aten::addmm", "matmul"), ("ncclKernel_AllReduce", "reduction"), ("zzz", "other"),
])
def test_categorize(name, cat):
  assert step_profile.categorize(name) == cat


def test_summarize_per_step():
  ev = [("fusion.1", 1000.0), ("fusion_2", 3000.0), ("convolution.3", 4000.0),
        ("aten::add", 500.0, 5)]
  s = step_profile.summarize(ev, steps=2, top=2)
  assert s["total_ms"] == pytest.approx(4.25)
  assert s["categories"]["elementwise"] == pytest.approx(2.25)  # fusion.* and aten::add
  assert s["categories"]["convolution"] == pytest.approx(2.0)
  assert sum(s["categories"].values()) == pytest.approx(s["total_ms"])
  assert [o["name"] for o in s["ops"]] == ["fusion", "convolution"]  # suffixes merged
  assert s["ops"][0]["calls"] == 1.0 and s["ops"][0]["ms"] == pytest.approx(2.0)


def _write_trace(path, events, meta):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_trace_events_keep_the_device_streams(tmp_path):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7,
           "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "XLA Ops"}}]
  ev = [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 900},
        {"ph": "X", "pid": 2, "tid": 7, "name": "sm90_xmma_fprop_x", "ts": 0, "dur": 300},
        {"ph": "X", "pid": 2, "tid": 7, "name": "loop_add_fusion", "ts": 300, "dur": 100},
        {"ph": "X", "pid": 2, "tid": 9, "name": "convolution.4", "ts": 0, "dur": 300}]
  path = tmp_path / "a.trace.json.gz"
  _write_trace(path, ev, meta)
  events, lines = step_profile.jax_trace_events(str(path))
  assert sorted(events) == [("loop_add_fusion", 100), ("sm90_xmma_fprop_x", 300)]
  assert lines["/device:GPU:0 / XLA Ops"] == pytest.approx(0.3)
  # A CPU trace: XLA's ops on the host threads, the dispatch wrappers left out.
  meta = meta[:1]
  ev = [dict(e, pid=1) for e in ev]
  ev.append({"ph": "X", "pid": 1, "tid": 1, "name": "TfrtCpuExecutable::Execute", "dur": 5})
  _write_trace(path, ev, meta)
  events, _ = step_profile.jax_trace_events(str(path))
  assert sorted(n for n, _ in events) == ["convolution.4", "loop_add_fusion",
                                          "sm90_xmma_fprop_x"]


def test_profile_jax_finds_the_convolution(tmp_path):
  x = jnp.ones((4, 32, 32, 16))
  w = jnp.ones((3, 3, 16, 16))

  @jax.jit
  def f(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).sum()

  f(x, w).block_until_ready()
  s = step_profile.profile_jax(lambda: f(x, w).block_until_ready(), str(tmp_path), steps=2)
  assert s["steps"] == 2 and s["total_ms"] > 0
  assert s["categories"]["convolution"] > 0
  assert s["trace"].endswith(".trace.json.gz")


def test_profile_torch_finds_the_convolution():
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(8, 8, 3, padding=1)
  x = torch.ones(2, 8, 16, 16)

  def run():
    conv(x).relu().sum().backward()

  s = step_profile.profile_torch(run, steps=2)
  assert s["categories"]["convolution"] > 0 and s["total_ms"] > 0
  assert s["ops"] and all(o["calls"] > 0 for o in s["ops"])


def test_bench_profile_and_known_peaks(tmp_path):
  tiny = ["--width=0.125", "--stage_sizes=1,1,1,1", "--embedding_dim=32", "--classes=10",
          "--size=28", "--batch=4", "--steps=1", "--lr_sizes=7", "--tune_cpu=0",
          "--torch=none", "--steps_kind=askd", f"--profile={tmp_path / 'prof'}",
          "--profile_steps=1", "--memory_batch=4"]
  res = bench.main(tiny)
  assert list(res["profiles"]) == ["jax askd b4"]
  assert res["profiles"]["jax askd b4"]["categories"]["convolution"] > 0
  assert "Profile (" in res["markdown"] and "| jax askd b4 |" in res["markdown"]
  # The timed step's peak is reused (same compiler options), batch 2 is compiled anew.
  mem = res["memory"]
  assert mem["peak_bytes"] > mem["peak_bytes_half"] > 0
  args = bench.parse_args(tiny)
  fake = bench.memory_report(args, 4, known={4: 10 ** 12})
  assert fake["peak_bytes"] == 10 ** 12 and fake["peak_bytes_half"] == mem["peak_bytes_half"]
  # Compiled from shapes alone (eval_shape of init), the plan is the timed step's.
  assert bench.memory_report(args, 4)["peak_bytes"] == mem["peak_bytes"]
