"""The `casia` preset's learning rate, step by step, against PyTorch's own MultiStepLR driven
in the official loop order (train_teacher.py / train_student.py: `scheduler.step()` at the
START of every epoch, then the epoch's optimizer steps).

Checked by hand: with the plain reading of the milestones (lr_boundaries=(6, 11, 15, 17),
the code before this test) the comparison fails from the first step of epoch 5 on."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import configs.facerec as facerec  # noqa: E402
from askd_jax.train import loop  # noqa: E402
from askd_jax.train.optim import sgd_torch  # noqa: E402

STEPS_PER_EPOCH = 3  # the casia schedule scaled to a few steps per epoch


def _official_run(tcfg, grads):
  """torch SGD + MultiStepLR([6, 11, 15, 17]) as the official loop calls them: the lr of
  every step and the parameter after it."""
  p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
  opt = torch.optim.SGD([{"params": [p], "weight_decay": 5e-4}], lr=0.1, momentum=0.9,
                        nesterov=True)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[6, 11, 15, 17], gamma=0.1)
  lrs, params, step = [], [], 0
  for _ in range(tcfg.epochs):
    sched.step()  # the official order (PyTorch warns about it; that is the point)
    for _ in range(STEPS_PER_EPOCH):
      lrs.append(opt.param_groups[0]["lr"])
      opt.zero_grad()
      p.grad = torch.tensor(grads[step], dtype=torch.float64)
      opt.step()
      params.append(p.detach().numpy().copy())
      step += 1
  return np.array(lrs), np.array(params)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_casia_schedule_matches_multisteplr_in_the_official_loop_order():
  tcfg = facerec.get_config("casia").train
  total = tcfg.epochs * STEPS_PER_EPOCH
  grads = np.random.default_rng(0).normal(size=(total, 2))
  want_lr, want_p = _official_run(tcfg, grads)
  # per epoch: 0.1 x5, 0.01 x5, 1e-3 x4, 1e-4 x2, 1e-5 x4
  per_epoch = [0.1] * 5 + [0.01] * 5 + [1e-3] * 4 + [1e-4] * 2 + [1e-5] * 4
  np.testing.assert_allclose(want_lr, np.repeat(per_epoch, STEPS_PER_EPOCH), rtol=1e-12)

  # What train_stage builds: sgd_torch(loop._schedule(...), momentum, weight_decay, nesterov).
  sched = loop._schedule(tcfg, STEPS_PER_EPOCH, total)
  got_lr = np.array([float(sched(i)) for i in range(total)])
  np.testing.assert_allclose(got_lr, want_lr, rtol=1e-6)
  tx = sgd_torch(sched, tcfg.momentum, tcfg.weight_decay, tcfg.get("nesterov", True))
  p = np.array([1.0, -2.0], np.float32)
  state = tx.init(p)
  for i in range(total):
    upd, state = tx.update(grads[i].astype(np.float32), state, p)
    p = p + np.asarray(upd)
    np.testing.assert_allclose(p, want_p[i], rtol=1e-5, atol=1e-6, err_msg=f"step {i}")


def test_plain_milestone_reading_is_one_epoch_later():
  """The documented alternative (--config.train.lr_boundaries=6,11,15,17)."""
  tcfg = facerec.get_config("casia").train
  tcfg.lr_boundaries = (6, 11, 15, 17)
  sched = loop._schedule(tcfg, 1, tcfg.epochs)
  got = [float(sched(e)) for e in range(tcfg.epochs)]
  want = [0.1] * 6 + [0.01] * 5 + [1e-3] * 4 + [1e-4] * 2 + [1e-5] * 3
  np.testing.assert_allclose(got, want, rtol=1e-5)
