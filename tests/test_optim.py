"""Learning-rate schedules keep their boundaries at absolute epochs."""
from __future__ import annotations

import numpy as np

from askd_jax.train.optim import step_schedule


def test_step_schedule_boundaries_are_absolute_with_warmup():
  s = step_schedule(0.1, steps_per_epoch=10, boundaries_epochs=(3, 5), warmup_epochs=1)
  lrs = np.array([float(s(i)) for i in range(60)])
  np.testing.assert_allclose(lrs[0], 0.0)
  np.testing.assert_allclose(lrs[10:30], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[30:50], 0.01, rtol=1e-5)
  np.testing.assert_allclose(lrs[50:], 0.001, rtol=1e-5)


def test_step_schedule_paper_recipe():
  s = step_schedule(0.1, steps_per_epoch=100, boundaries_epochs=(6, 11, 15, 17))
  got = [float(s(e * 100)) for e in (0, 5, 6, 10, 11, 15, 17, 19)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-5, 1e-5], rtol=1e-5)
