"""Config blocks shared by configs/{facerec,imagenet,widerface}.py.

Every task trains the same way (one loop, SGD, teacher then students, the same
distillation methods), so the fields that describe that live here once; each config file
sets only the values its recipe changes. Kept in the package (not beside the config files)
so a config loaded by an absolute path from any directory can import it.
"""
from __future__ import annotations

from typing import Tuple

import ml_collections
from ml_collections import config_dict


def run(c: ml_collections.ConfigDict, task: str, preset: str, dtype: str = "float32") -> None:
  """Top-level fields of a run."""
  c.task = task
  c.preset = preset
  c.seed = 0
  c.dtype = dtype                  # compute dtype (bfloat16 on GPU/TPU); params, BN statistics,
  #                                  logits and losses stay float32
  c.distributed = False            # jax.distributed.initialize() for multi-host runs
  c.shard_params_min_size = 0      # >0: split leaves this large (a margin weight) over devices
  c.jax_cache_dir = "~/.cache/askd_jax/xla"  # persistent compilation cache ('' to disable)
  c.tune_cpu = True                # askd_jax.runtime.tune_cpu(): XLA:CPU allocator/dispatch


def train(**recipe) -> ml_collections.ConfigDict:
  """The SGD loop's fields; `recipe` sets the task's values (lr, epochs, schedule...)."""
  t = ml_collections.ConfigDict()
  t.batch_size = 128               # global batch (per-device batch x devices)
  t.epochs = 20
  t.steps = 0                      # >0 overrides epochs
  t.lr = 0.1
  t.schedule = "step"              # step | cosine (after warm-up)
  t.lr_boundaries = ()             # schedule=step: epochs at which lr *= lr_factor
  t.lr_factor = 0.1
  t.warmup_epochs = 0.0            # linear warm-up from 0
  t.momentum = 0.9
  t.nesterov = True
  t.weight_decay = 5e-4            # coupled (torch.optim.SGD), on every parameter
  t.log_every = 100
  t.checkpoint_every = 2000        # steps; 0 = only at the end (and on SIGTERM)
  t.keep = 2
  t.nan_policy = "stop"            # stop | skip (skip the step, count it, stop past max_bad_steps)
  t.max_bad_steps = 100
  for k, v in recipe.items():
    if k not in t:
      raise KeyError(f"config_blocks.train has no field {k!r}")
    t[k] = v
  return t


def student(**recipe) -> ml_collections.ConfigDict:
  """Students: which sizes, which methods, how the low-resolution images are made."""
  s = ml_collections.ConfigDict()
  s.sizes = (14, 28, 56)           # one student per size (each sees HR -> size -> HR)
  s.methods = ("none", "askd")
  s.teacher = ""                   # trained teacher dir ('' = train one in WORKDIR/teacher)
  s.mode = "official"              # down-sampling: official (nearest) | bilinear | bicubic | area
  s.blur = "official"              # official (fixed sigma 0.1 x 2.0) | random | none
  s.eval_teacher_lr = True         # also evaluate the teacher on each LR size
  for k, v in recipe.items():
    s[k] = v
  return s


def distill() -> ml_collections.ConfigDict:
  """Every method's weights and options, from the registry's defaults (the papers' values):
  askd 5.0, at 1000, fkd 1.0, horkd 1.0 x (individual 1, pair 0.1, triplet 0.2, group 0.1)."""
  from askd_jax.distill import DEFAULTS  # the losses define their own defaults
  return ml_collections.ConfigDict({k: dict(v) for k, v in DEFAULTS.items() if v})


def sizes_from_factors(factors_ref: config_dict.FieldReference,
                       size_ref: config_dict.FieldReference) -> config_dict.FieldReference:
  """A lazy tuple: image_size // f for each factor, re-evaluated after command-line overrides."""
  def fn(factors: Tuple[int, ...]) -> Tuple[int, ...]:
    size = size_ref.get()
    for f in factors:
      if not isinstance(f, int) or f < 1 or size % f:
        raise ValueError(f"config.student.factors has {f!r}: factors must be integers >= 1 "
                         f"dividing data.image_size={size}")
    return tuple(size // f for f in factors)
  return factors_ref._apply_op(fn)  # pylint: disable=protected-access  (no public lazy map)


def factor_students(c: ml_collections.ConfigDict, factors: Tuple[int, ...],
                    **recipe) -> None:
  """`c.student` whose sizes follow `student.factors` of `data.image_size` (a FieldReference)."""
  s = ml_collections.ConfigDict()
  s.factors = ml_collections.FieldReference(tuple(factors))
  s.sizes = sizes_from_factors(s.get_ref("factors"), c.data.get_ref("image_size"))
  for k, v in student(**recipe).items():
    if k != "sizes":
      s[k] = v
  c.student = s
