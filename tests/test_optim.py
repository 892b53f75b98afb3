"""Learning-rate schedules keep their boundaries at absolute epochs."""
from __future__ import annotations

import numpy as np
import pytest

from askd_jax.train.optim import step_schedule


def test_step_schedule_boundaries_are_absolute_with_warmup():
  s = step_schedule(0.1, steps_per_epoch=10, boundaries_epochs=(3, 5), warmup_epochs=1)
  lrs = np.array([float(s(i)) for i in range(60)])
  np.testing.assert_allclose(lrs[0], 0.0)
  np.testing.assert_allclose(lrs[10:30], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[30:50], 0.01, rtol=1e-5)
  np.testing.assert_allclose(lrs[50:], 0.001, rtol=1e-5)


def test_step_schedule_drops_at_the_boundary_epochs():
  # lr *= 0.1 from the first step of each boundary epoch (the casia preset's official
  # per-epoch rates are pinned against torch in tests/test_official_schedule.py)
  s = step_schedule(0.1, steps_per_epoch=100, boundaries_epochs=(6, 11, 15, 17))
  got = [float(s(e * 100)) for e in (0, 5, 6, 10, 11, 15, 17, 19)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-5, 1e-5], rtol=1e-5)


def test_cosine_schedule_warmup_clamped_to_short_runs():
  from askd_jax.train.optim import cosine_schedule
  s = cosine_schedule(0.1, 100, 10)
  np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(100))],
                             [0.0, 0.05, 0.1, 0.0], atol=1e-7)
  np.testing.assert_allclose(float(s(55)), 0.05, rtol=1e-5)  # half-way down the cosine
  short = cosine_schedule(0.1, 10, 500)  # warm-up longer than the run
  lrs = np.array([float(short(i)) for i in range(11)])
  assert np.isfinite(lrs).all() and lrs.max() == pytest.approx(0.1)
  assert np.argmax(lrs) == 9 and lrs[0] == 0.0
  one = cosine_schedule(0.1, 1, 5)
  assert np.isfinite(float(one(0)))
