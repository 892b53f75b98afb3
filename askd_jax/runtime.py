"""Process-wide settings that make XLA:CPU training faster: `tune_cpu()`, called once at start.

Measured on the 2-core development machine (full iResNet50-CBAM, 112 px, float32; see
docs/benchmarks.md): without them every training step maps its large buffers afresh and
takes their pages one fault at a time, ~215k minor page faults per step at batch 8 and
~650k at batch 32, 0.5-2 CPU-seconds of kernel time per step (more on a busy machine).
The causes and the fixes:

* XLA:CPU allocates a step's buffers with posix_memalign. glibc serves requests above its
  mmap threshold (at most 32 MB) with a fresh mmap and returns them with munmap on free,
  so the next step faults every page in again. `M_MMAP_MAX=0` makes the main arena serve
  them from its heap and `M_TRIM_THRESHOLD=max` keeps the freed heap mapped for reuse.
* JAX runs CPU computations on a dispatch thread by default. glibc gives such threads
  their own arenas, which are built of 64 MB heaps and fall back to mmap for anything
  larger, whatever the options above say. With asynchronous dispatch off
  (`jax_cpu_enable_async_dispatch=False`) the step is launched from the calling thread and
  allocates from the main arena. (One arena for all threads, `M_ARENA_MAX=1`, also removes
  the faults but serialises the allocations of XLA's worker threads: 2.5x slower.)

The memory a step freed stays in the process for the next step: the resident size is the
peak of the run, not of the step that is running. Other libraries' large allocations in
the process (e.g. PyTorch's on the main thread) are served the same way.

Only the main entry points (`askd_jax.main`, `askd_jax.tools.bench`) call this; importing
the package changes nothing. `askd_jax.main` skips it with `--config.tune_cpu=False`.
"""
from __future__ import annotations

import ctypes
import logging
import platform
from typing import Dict

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_SIZE_MAX = -1  # mallopt takes an int; glibc stores -1 as SIZE_MAX for the trim threshold

_applied: Dict[str, bool] = {}


def _mallopt():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return None


def tune_cpu() -> Dict[str, bool]:
  """Apply the settings above; returns which ones took effect.

  Call it before JAX creates its devices (the first computation, `jax.devices()`,
  `jax.distributed.initialize()`): asynchronous dispatch is a property of the CPU client,
  fixed when JAX creates it. Called later, it leaves dispatch as it is and says
  so in the log. On a libc other than glibc (macOS, musl) the allocator part is skipped.
  Safe to call more than once.
  """
  if _applied:
    return dict(_applied)
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  applied = {"sync_dispatch": False, "keep_heap": False}
  if xla_bridge.backends_are_initialized():
    logging.warning("askd_jax.runtime.tune_cpu() was called after JAX created its devices: "
                    "CPU dispatch stays asynchronous; call it before the first computation.")
    applied["sync_dispatch"] = not jax.config.read("jax_cpu_enable_async_dispatch")
  else:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    applied["sync_dispatch"] = True
  mallopt = _mallopt()
  if mallopt is not None:
    applied["keep_heap"] = bool(mallopt(M_MMAP_MAX, 0)) and bool(
        mallopt(M_TRIM_THRESHOLD, _SIZE_MAX))
  _applied.update(applied)
  return applied
