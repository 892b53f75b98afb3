"""Parity of the Flax model with the official PyTorch definition, through the converter.

A random-initialised PyTorch reference (askd_jax.tools.torch_reference, official parameter
names) with random BN statistics and PReLU slopes is saved in the official checkpoint
format, converted, and run side by side with the Flax model: eval and train forwards,
running statistics, one SGD step, ArcFace logits and the BGR/RGB stem handling.
"""
from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="parity tests compare against PyTorch (optional)")

from askd_jax import ops  # noqa: E402
from askd_jax.models import ArcFace, MarginModel, iresnet_cbam  # noqa: E402
from askd_jax.tools import convert  # noqa: E402
from askd_jax.tools import torch_reference as tr  # noqa: E402
from askd_jax.train.optim import sgd_torch  # noqa: E402

SMALL = dict(stage_sizes=(1, 2, 2, 1), width=0.25, input_size=32)
CLASSES = 10
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rel_diff(a, b) -> float:
  """max |a - b| over max |b|: the error relative to the tensor's scale."""
  return _max_diff(a, b) / max(float(np.max(np.abs(b))), 1e-12)


def _save_official(tmp_path_factory, net, margin=None):
  """torch.save in the official layout; returns the converted (variables, arch)."""
  d = tmp_path_factory.mktemp("official")
  torch.save({"iters": 0, "net_state_dict": net.state_dict()}, d / "last_net.ckpt")
  margin_state = None
  if margin is not None:  # the official script stores the margin under the same key
    torch.save({"iters": 0, "net_state_dict": margin.state_dict()}, d / "last_margin.ckpt")
    margin_state = convert.load_torch_state(str(d / "last_margin.ckpt"))
  return convert.torch_state_to_flax(convert.load_torch_state(str(d / "last_net.ckpt")),
                                     margin_state, channel_order="bgr")


def _inputs(batch, size, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Full iResNet50-CBAM: one eval forward (CPU is slow).

@pytest.fixture(scope="module")
def full(tmp_path_factory):
  torch.manual_seed(0)
  net = tr.randomize_(tr.iresnet_cbam(50), seed=1).eval()
  variables, arch = _save_official(tmp_path_factory, net)
  return net, variables, arch


def test_full_iresnet50_eval_parity(full):
  net, variables, arch = full
  assert arch["depth"] == 50 and arch["stage_sizes"] == (3, 4, 14, 3)
  x = _inputs(2, 112)
  with torch.no_grad():
    emb_t, ft = net(torch.from_numpy(x))
  model = MarginModel(iresnet_cbam(50, cpu_ops=ops.on_cpu()))  # as the task builds it here
  out, fj = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert float(emb_t.abs().max()) > 0.1  # a non-trivial embedding
  assert _max_diff(out["embedding"], emb_t) <= 1e-4
  assert len(fj.channel_maps) == len(ft.channel_maps) == 24
  for i, (a, b) in enumerate(zip(fj.channel_maps, ft.channel_maps)):
    assert _max_diff(a, b) <= 1e-4, f"channel map {i}"
  for i, (a, b) in enumerate(zip(fj.spatial_maps, ft.spatial_maps)):
    assert a.shape == b.shape and _max_diff(a, b) <= 1e-4, f"spatial map {i}"
  for i, (a, b) in enumerate(zip(fj.stages, ft.stages)):
    assert _max_diff(a, _nhwc(b)) <= 1e-4, f"stage {i + 1}"


# ---------------------------------------------------------------------------------------
# A small variant for everything else.

@pytest.fixture(scope="module")
def small(tmp_path_factory):
  torch.manual_seed(0)
  # Dropout off on both sides, so the train-mode forwards are deterministic.
  net = tr.randomize_(tr.iresnet_cbam(**SMALL, drop_ratio=0.0), seed=2)
  margin = tr.ArcMarginProduct(512, CLASSES)
  variables, arch = _save_official(tmp_path_factory, net, margin)
  model = MarginModel(iresnet_cbam(stage_sizes=arch["stage_sizes"], width=arch["width"],
                                   dropout=0.0, cpu_ops=ops.on_cpu()),
                      ArcFace(num_classes=arch["num_classes"]))
  return net, margin, variables, model


def _train_forward(model):
  def loss_fn(params, batch_stats, x, y):
    (out, feats), upd = model.apply({"params": params, "batch_stats": batch_stats}, x, y,
                                    train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
    return loss, (out, feats, upd["batch_stats"])
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.fixture(scope="module")
def train_step(small):
  """One official training step in PyTorch and the Flax forward/gradient on the same batch."""
  net, margin, variables, model = small
  net, margin = copy.deepcopy(net).train(), copy.deepcopy(margin).train()
  x, y = _inputs(8, SMALL["input_size"], seed=3), np.array([1, 3, 5, 7, 0, 2, 9, 1])
  opt = torch.optim.SGD([{"params": net.parameters(), "weight_decay": WD},
                         {"params": margin.parameters(), "weight_decay": WD}],
                        lr=LR, momentum=MOMENTUM, nesterov=True)
  emb_t, ft = net(torch.from_numpy(x))
  logits_t = margin(emb_t, torch.from_numpy(y))
  loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(y))
  opt.zero_grad()
  loss_t.backward()
  grads_t, _ = convert.torch_state_to_flax(  # torch's gradients in the Flax layout
      {n: p.grad.numpy() for n, p in net.named_parameters()} | _fake_stats(net),
      {"weight": margin.weight.grad.numpy()}, channel_order="bgr")
  opt.step()
  after, _ = convert.torch_state_to_flax(tr.numpy_state(net), tr.numpy_state(margin),
                                         channel_order="bgr")
  (loss_j, (out, fj, stats_j)), grads_j = _train_forward(model)(
      variables["params"], variables["batch_stats"], jnp.asarray(x.transpose(0, 2, 3, 1)),
      jnp.asarray(y))
  return dict(torch=dict(loss=loss_t.item(), emb=emb_t.detach(), logits=logits_t.detach(),
                         feats=ft, after=after, grads=grads_t["params"]),
              jax=dict(loss=float(loss_j), out=out, feats=fj, stats=stats_j, grads=grads_j),
              before=variables)


def _fake_stats(net):
  """BN buffers are not gradients; give the converter placeholders of the right shapes."""
  return {n: np.zeros(b.shape, np.float32) for n, b in net.named_buffers()
          if "num_batches" not in n}


def test_train_forward_and_running_stats(train_step):
  t, j = train_step["torch"], train_step["jax"]
  assert abs(j["loss"] - t["loss"]) <= 1e-5 * max(1.0, abs(t["loss"]))
  assert _max_diff(j["out"]["embedding"], t["emb"]) <= 1e-4
  assert _max_diff(j["out"]["logits"], t["logits"]) <= 1e-4
  for a, b in zip(j["feats"].channel_maps + j["feats"].spatial_maps,
                  t["feats"].channel_maps + t["feats"].spatial_maps):
    assert _max_diff(a, b.detach()) <= 1e-4
  # Running statistics after one train forward (torch: unbiased variance, momentum 0.1).
  stats_t = t["after"]["batch_stats"]
  before = train_step["before"]["batch_stats"]
  moved = 0
  for (path, a), b, b0 in zip(jax.tree_util.tree_flatten_with_path(j["stats"])[0],
                              jax.tree.leaves(stats_t), jax.tree.leaves(before)):
    tol = 1e-5 * max(1.0, float(np.max(np.abs(b))))
    assert _max_diff(a, b) <= tol, jax.tree_util.keystr(path)
    moved += _max_diff(b, b0) > 1e-3
  assert moved == len(jax.tree.leaves(before))  # every statistic was updated


def _apply_sgd(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def _worst_rel(a, b) -> float:
  return max(_rel_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


NAIVE = {  # optax chains that look like torch.optim.SGD(weight_decay=...) but are not
    "decoupled decay (AdamW-style)": optax.chain(
        optax.sgd(LR, MOMENTUM, nesterov=True), optax.add_decayed_weights(-LR * WD)),
    "decay added after sgd": optax.chain(
        optax.sgd(LR, MOMENTUM, nesterov=True), optax.add_decayed_weights(WD)),
    "no weight decay": optax.sgd(LR, MOMENTUM, nesterov=True),
}


def test_sgd_step_matches_torch(train_step):
  t, j = train_step["torch"], train_step["jax"]
  params = train_step["before"]["params"]
  # End to end: Flax gradients + sgd_torch == torch forward/backward + torch.optim.SGD.
  new = _apply_sgd(sgd_torch(LR, MOMENTUM, WD, nesterov=True), params, j["grads"])
  assert _worst_rel(new, t["after"]["params"]) <= 1e-5
  # The weights moved by much more than the tolerance, so the check has teeth.
  assert _worst_rel(params, t["after"]["params"]) > 1e-3
  for name, tx in NAIVE.items():
    assert _worst_rel(_apply_sgd(tx, params, j["grads"]), t["after"]["params"]) > 1e-5, name


def test_sgd_semantics_on_torch_gradients(train_step):
  """The optimizer alone, fed torch's own gradients: tighter, and the naive chains fail."""
  t = train_step["torch"]
  params = train_step["before"]["params"]
  new = _apply_sgd(sgd_torch(LR, MOMENTUM, WD, nesterov=True), params, t["grads"])
  assert _worst_rel(new, t["after"]["params"]) <= 1e-6
  for name, tx in NAIVE.items():
    assert _worst_rel(_apply_sgd(tx, params, t["grads"]), t["after"]["params"]) > 1e-5, name


def test_gradients_match(train_step):
  t, j = train_step["torch"], train_step["jax"]
  flat_t = dict(jax.tree_util.tree_flatten_with_path(t["grads"])[0])
  for path, g in jax.tree_util.tree_flatten_with_path(j["grads"])[0]:
    # The floor: some gradients are 0 in exact arithmetic (a per-channel shift followed
    # only by train-mode BN, e.g. the fc bias before BN1d); both sides are then ~1e-8 noise.
    tol = 1e-3 * float(np.max(np.abs(flat_t[path]))) + 1e-6
    assert _max_diff(g, flat_t[path]) <= tol, jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------
# ArcFace and the channel order.

def test_arcface_logits_both_branches():
  torch.manual_seed(5)
  margin = tr.ArcMarginProduct(16, 6, s=32.0, m=0.5)
  w = margin.weight.detach().numpy()
  rng = np.random.RandomState(0)
  labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
  emb = rng.normal(size=(8, 16)).astype(np.float32)
  # Half the samples point away from their class centre: cos(theta) <= cos(pi - m).
  emb[4:] = -w[labels[4:]] * 3.0 + 0.05 * rng.normal(size=(4, 16)).astype(np.float32)
  emb[2] = w[labels[2]] * 2.0 + 0.01 * rng.normal(size=16).astype(np.float32)  # cos ~ 1
  cos_target = np.sum(emb / np.linalg.norm(emb, axis=1, keepdims=True) *
                      (w / np.linalg.norm(w, axis=1, keepdims=True))[labels], axis=1)
  th = math.cos(math.pi - 0.5)
  assert np.sum(cos_target <= th) >= 4 and np.sum(cos_target > th) >= 4
  with torch.no_grad():
    ref = margin(torch.from_numpy(emb), torch.from_numpy(labels)).numpy()
  head = ArcFace(num_classes=6, s=32.0, m=0.5)
  got = head.apply({"params": {"kernel": w}}, jnp.asarray(emb), jnp.asarray(labels))
  assert np.all(np.isfinite(ref))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  # The branch matters: on the far samples cos(theta + m) would be a very different logit.
  naive = 32.0 * np.cos(np.arccos(cos_target) + 0.5)
  target_logits = np.asarray(got)[np.arange(8), labels]
  far = cos_target <= th
  assert np.all(np.abs(target_logits[far] - naive[far]) > 1.0)
  np.testing.assert_allclose(target_logits[~far], naive[~far], atol=1e-4)


def test_bgr_official_equals_converted_rgb(small, tmp_path):
  net = copy.deepcopy(small[0]).eval()
  torch.save({"net_state_dict": net.state_dict()}, tmp_path / "net.ckpt")
  state = convert.load_torch_state(str(tmp_path / "net.ckpt"))
  rgb_vars, arch = convert.torch_state_to_flax(state)  # default: converted model eats RGB
  assert arch["channel_order"] == "rgb"
  bgr = _inputs(2, SMALL["input_size"], seed=4)  # what the official model is fed
  with torch.no_grad():
    ref, _ = net(torch.from_numpy(bgr))
  model = iresnet_cbam(stage_sizes=SMALL["stage_sizes"], width=SMALL["width"],
                       cpu_ops=ops.on_cpu())
  bb = {c: rgb_vars[c]["backbone"] for c in ("params", "batch_stats")}
  fwd = jax.jit(lambda x: model.apply(bb, x)[0])
  rgb = jnp.asarray(bgr[:, ::-1].transpose(0, 2, 3, 1))
  assert _max_diff(fwd(rgb), ref) <= 1e-4
  assert _max_diff(fwd(rgb[..., ::-1]), ref) > 1e-2  # feeding BGR to it would be wrong
  # And the inverse mapping gives back the official (BGR) stem.
  back, _ = convert.flax_to_torch_state(rgb_vars)
  np.testing.assert_array_equal(back["input_layer.0.weight"], state["input_layer.0.weight"])
