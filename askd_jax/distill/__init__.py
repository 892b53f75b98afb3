"""Distillation methods behind one signature and a registry.

    fn(student: Features, teacher: Features, labels: (B,) int, cfg) -> (loss, metrics)

`loss` is an f32 scalar already weighted; `metrics` a dict of f32 scalars. `cfg` is any
mapping with `.get` (dict or ml_collections.ConfigDict); missing keys take DEFAULTS[name].
The teacher never receives gradient (every method applies stop_gradient to it).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax

from askd_jax.distill import askd, at, fkd, horkd, none

LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]

REGISTRY: Dict[str, LossFn] = {
    "askd": askd.askd_loss,
    "at": at.at_loss,
    "fkd": fkd.fkd_loss,
    "horkd": horkd.horkd_loss,
    "none": none.none_loss,
}

DEFAULTS: Dict[str, Mapping[str, Any]] = {
    "askd": dict(askd.DEFAULTS),
    "at": dict(at.DEFAULTS),
    "fkd": dict(fkd.DEFAULTS),
    "horkd": dict(horkd.DEFAULTS),
    "none": dict(none.DEFAULTS),
}


def get(name: str) -> LossFn:
  """The loss function registered under `name`."""
  if name not in REGISTRY:
    raise ValueError(f"unknown distillation method {name!r}; valid names: "
                     f"{', '.join(sorted(REGISTRY))}.")
  return REGISTRY[name]


__all__ = ["REGISTRY", "DEFAULTS", "get"]
