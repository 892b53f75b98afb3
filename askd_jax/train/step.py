"""The train step: one pure function for the teacher stage and every student stage.

    step(state, teacher_variables, batch) -> (state, metrics)

Student stages degrade the high-resolution batch on device (so HR and LR views come from
one decode), run the frozen teacher on HR in eval mode, and add the distillation loss.
A step whose loss or gradient is not finite leaves the state untouched and is recorded
in it (bad_steps, first_bad_step, bad_terms): the loop decides to stop or go on.
The two forwards are named scopes, "teacher" and "student", so profiles split them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from askd_jax import ops
from askd_jax.train.state import TrainState


def make_train_step(*, task, model, tx: optax.GradientTransformation, cpu_ops: bool,
                    teacher_model=None, distill_fn: Optional[Callable] = None,
                    distill_cfg: Any = None, degrade_fn: Optional[Callable] = None):
  """Build the (not yet jitted) step for one stage; `cpu_ops` as the model's (the gradient
  norm's formulation)."""

  def step(state: TrainState, teacher_vars, batch):
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(key, state.step)
    k_drop, k_deg = jax.random.split(key)
    hr = task.preprocess(batch)                         # (B, H, W, C) float32 in [-1, 1]
    x = degrade_fn(hr, k_deg) if degrade_fn is not None else hr

    t_feats = None
    if teacher_model is not None:
      (_, t_feats), _ = jax.named_call(task.forward, name="teacher")(
          teacher_model, teacher_vars, hr, batch, train=False)
      t_feats = jax.lax.stop_gradient(t_feats)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (out, feats), new_stats = jax.named_call(task.forward, name="student")(
          model, variables, x, batch, train=True, rngs={"dropout": k_drop})
      loss, terms = task.loss(out, batch)
      terms = dict(terms, task_loss=loss)
      if distill_fn is not None:
        d_loss, d_terms = distill_fn(feats, t_feats, batch.get("label"), distill_cfg)
        terms.update({f"distill/{k}": v for k, v in d_terms.items()})
        terms["distill_loss"] = d_loss
        loss = loss + d_loss
      terms["loss"] = loss
      return loss, (new_stats, terms)

    (loss, (new_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    gnorm = ops.global_norm(grads, cpu=cpu_ops)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    terms["grad_norm"] = gnorm
    first = state.first_bad_step < 0
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(new_stats.get("batch_stats", state.batch_stats), state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        bad_steps=state.bad_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
        first_bad_step=jnp.where(~finite & first, state.step, state.first_bad_step),
        bad_terms=jax.tree.map(lambda t, o: jnp.where(~finite & first, t, o),
                               {k: terms.get(k, jnp.float32(0)) for k in state.bad_terms},
                               state.bad_terms),
    )
    metrics = dict(terms, finite=finite.astype(jnp.float32))
    return new_state, metrics

  return step


# XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. The weight-gradient
# convolution of a 3x3 conv (a 28x28-kernel, 3x3-output convolution over the batch) runs
# there ~4x slower than in XLA's Eigen convolution, and dominates the training step on CPU
# (measured: iResNet50-CBAM step ~2x faster with Eigen convolutions). Keep YNNPACK for
# the dots only. Pass to `jax.jit(step, compiler_options=compiler_options())`.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(backend: Optional[str] = None) -> dict:
  """XLA options that make the train step fast on `backend` (default: JAX's default)."""
  return dict(CPU_COMPILER_OPTIONS) if ops.on_cpu(backend) else {}


BAD_TERMS = ("loss", "task_loss", "distill_loss", "grad_norm")


def init_state(params, batch_stats, tx, rng_key) -> TrainState:
  return TrainState(
      step=jnp.int32(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      rng=jax.random.key_data(rng_key), bad_steps=jnp.int32(0), first_bad_step=jnp.int32(-1),
      bad_terms={k: jnp.float32(0) for k in BAD_TERMS})
