"""askd_jax.runtime.tune_cpu: what it sets, and that it stops the per-step page faults."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Jitted steps whose buffers are large (64 MB, above glibc's largest mmap threshold), as
# the iResNet50 step's are: a new 64 MB output per call, and a 64 MB temporary per call.
# Prints the minor page faults of 6 calls of each, after two warm-up calls (the first maps
# the heap that later calls reuse).
_STEP = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from askd_jax import runtime
tuned = runtime.tune_cpu() if sys.argv[1] == "tune" else {}
x = jnp.ones((4096, 4096), jnp.float32)
out = jax.jit(lambda x: jnp.tanh(x * 1.5) + 1.0)
temp = jax.jit(lambda x: jnp.sum(jnp.tanh(jnp.cumsum(x, 0))))
faults = {}
for name, f in (("out", out), ("temp", temp)):
  for _ in range(2):
    y = f(x).block_until_ready()
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(6):
    y = f(x).block_until_ready()
  faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
print(json.dumps({"tuned": tuned, "faults": faults, "first": float(out(x)[0, 0]),
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _run(code, *args):
  r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator settings are glibc's")
def test_tune_cpu_keeps_step_buffers_mapped():
  plain, _ = _run(_STEP, "plain")
  tuned, _ = _run(_STEP, "tune")
  assert tuned["tuned"] == {"sync_dispatch": True, "keep_heap": True}
  assert plain["async"] is True and tuned["async"] is False
  assert tuned["first"] == plain["first"] == pytest.approx(1.0 + math.tanh(1.5))
  # Untuned: every call maps its 64 MB output afresh (16k pages of 4 KiB) and its
  # temporaries (~49k faults per call). Tuned: the freed heap is reused; what remains is a
  # temporary that XLA allocates on a worker thread (mmap whatever the settings, ~16k per
  # call) and, in 0-3 of the 6 calls, an output that did not fit a freed chunk (glibc's
  # memalign needs a little more than the chunk freed). Measured: 0.21-0.42 of the faults.
  plain_total, tuned_total = sum(plain["faults"].values()), sum(tuned["faults"].values())
  assert plain["faults"]["out"] > 6 * 16384 * 0.9
  assert tuned_total < 0.6 * plain_total, (tuned["faults"], plain["faults"])


def test_tune_cpu_after_the_first_computation_keeps_dispatch_and_says_so():
  code = r"""
import json, jax, jax.numpy as jnp
from askd_jax import runtime
jnp.ones(3).block_until_ready()
first = runtime.tune_cpu()
print(json.dumps({"first": first, "again": runtime.tune_cpu(),
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""
  res, err = _run(code)
  assert res["first"]["sync_dispatch"] is False and res["async"] is True
  assert res["again"] == res["first"]
  assert "called after JAX created its devices" in err
