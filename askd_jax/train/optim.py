"""The optimizer and learning-rate schedules.

`torch.optim.SGD(lr, momentum, weight_decay, nesterov=True)` computes, per step,
    g <- g + wd * p;  buf <- momentum * buf + g;  d <- g + momentum * buf;  p <- p - lr * d
(buf starts as g on the first step, which equals 0 * momentum + g). The optax chain
`add_decayed_weights(wd) -> sgd(lr, momentum, nesterov=True)` is exactly that, with the
decay on *every* parameter (BN, PReLU and margin included) as in the official code.
A naive `optax.sgd` followed by decay (or decoupled AdamW-style decay) is not.
"""
from __future__ import annotations

from typing import Sequence

import optax


def step_schedule(base_lr: float, steps_per_epoch: int, boundaries_epochs: Sequence[float],
                  factor: float = 0.1, warmup_epochs: float = 0.0):
  """Piecewise-constant lr, x factor at each boundary epoch; optional linear warm-up."""
  # join_schedules restarts the step count at the warm-up's end: shift the boundaries so
  # that they stay at their absolute epochs.
  warm = int(round(warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 0
  bounds = {int(round(e * steps_per_epoch)) - warm: factor for e in boundaries_epochs}
  sched = optax.piecewise_constant_schedule(base_lr, {b: f for b, f in bounds.items() if b > 0})
  if warm:
    sched = optax.join_schedules([optax.linear_schedule(0.0, base_lr, warm), sched], [warm])
  return sched


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0):
  """Linear warm-up from 0 over `warmup_steps`, then a cosine down to 0 at `total_steps`.

  A warm-up as long as the run (a short run of a long recipe, e.g. `train.steps=10` with
  500 warm-up iterations) is cut to end one step before the last, so the schedule exists
  and reaches `base_lr`."""
  total = max(int(total_steps), 1)
  warm = max(min(int(warmup_steps), total - 1), 0)
  return optax.warmup_cosine_decay_schedule(0.0, base_lr, warm, total)


def sgd_torch(learning_rate, momentum: float = 0.9, weight_decay: float = 5e-4,
              nesterov: bool = True) -> optax.GradientTransformation:
  """torch.optim.SGD semantics (coupled weight decay on every parameter)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
