"""LR degradation: official parity with PyTorch, per-sample sizes, jit, other modes, errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.data import degrade as D


def images(b=2, s=112, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (b, s, s, 3)).astype(np.float32))


def _torch():
  return pytest.importorskip("torch", reason="torch is needed for the PyTorch parity tests")


@pytest.mark.parametrize("size", [14, 24, 28, 56])
def test_official_matches_torch(size):
  torch = _torch()
  import ref_torch_losses as ref
  x = images()
  ours = np.asarray(D.degrade(x, None, size))
  want = ref.degrade_official(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), size)
  np.testing.assert_allclose(ours, want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_nearest_index_matches_torch_every_size():
  torch = _torch()
  for a, b in [(112, s) for s in range(1, 113)] + [(s, 112) for s in range(1, 113)]:
    t = torch.arange(a, dtype=torch.float32).reshape(1, 1, a)
    want = torch.nn.functional.interpolate(t, size=b).flatten().numpy().astype(np.int32)
    np.testing.assert_array_equal(D.torch_nearest_index(a, b), want, err_msg=f"{a}->{b}")


def test_jax_nearest_is_not_torch_nearest():
  # Why degrade.py indexes by hand: jax samples pixel centres, torch the top-left corner.
  jax_idx = np.asarray(jax.image.resize(jnp.arange(112.0), (14,), "nearest")).astype(int)
  np.testing.assert_array_equal(D.torch_nearest_index(112, 14), np.arange(14) * 8)
  assert (jax_idx != np.arange(14) * 8).all()


def test_official_blur_is_anisotropic_and_normalised():
  # A single bright row spreads along the height (sigma 2) and hardly along the width.
  x = jnp.zeros((1, 16, 16, 1)).at[0, 8, :, 0].set(1.0)
  y = np.asarray(D.gaussian_blur(x, *D.OFFICIAL_SIGMA))[0, :, :, 0]
  k = np.exp(-0.5 * (np.arange(-2, 3) / 2.0) ** 2)
  np.testing.assert_allclose(y[6:11, 8], k / k.sum(), atol=1e-6)
  x = jnp.zeros((1, 16, 16, 1)).at[0, :, 8, 0].set(1.0)  # a bright column barely spreads
  y = np.asarray(D.gaussian_blur(x, *D.OFFICIAL_SIGMA))[0, :, :, 0]
  assert y[8, 8] > 0.999 and y[8, 7] < 1e-6
  const = jnp.full((1, 12, 12, 2), 0.3)
  np.testing.assert_allclose(np.asarray(D.gaussian_blur(const, 2.0, 0.1)), 0.3, atol=1e-6)


def test_per_sample_sizes_deterministic_and_cover_every_size():
  sizes = (7, 14, 28)
  x = images(b=24, s=56, seed=1)
  rng = jax.random.PRNGKey(3)
  a = np.asarray(D.degrade(x, rng, sizes))
  b = np.asarray(D.degrade(x, rng, sizes))
  np.testing.assert_array_equal(a, b)
  singles = [np.asarray(D.degrade(x, None, s)) for s in sizes]
  picked = []
  for i in range(x.shape[0]):
    hits = [k for k, y in enumerate(singles) if np.allclose(a[i], y[i], atol=1e-6)]
    assert len(hits) == 1, f"sample {i} matches sizes {hits}"
    picked.append(hits[0])
  assert set(picked) == {0, 1, 2}
  other = np.asarray(D.degrade(x, jax.random.PRNGKey(4), sizes))
  assert not np.array_equal(a, other)


def test_jit():
  x = images(b=2, s=56, seed=2)
  rng = jax.random.PRNGKey(0)
  for kw in (dict(sizes=(14, 28)), dict(sizes=28, mode="bilinear", blur="random")):
    fn = jax.jit(functools.partial(D.degrade, **kw))
    np.testing.assert_allclose(np.asarray(fn(x, rng)), np.asarray(D.degrade(x, rng, **kw)),
                               atol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize("blur", ["official", "random", "none"])
def test_other_modes_shape_and_range(mode, blur):
  x = images(b=3, s=32, seed=3)
  y = D.degrade(x, jax.random.PRNGKey(1), (8, 16), mode=mode, blur=blur)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.min(y)) >= -1.0 - 1e-6 and float(jnp.max(y)) <= 1.0 + 1e-6
  assert float(jnp.mean(jnp.abs(y - x))) > 1e-3  # something was lost


def test_area_is_box_average_and_keeps_constants():
  m = D._area_matrix(112, 28)
  np.testing.assert_allclose(m, np.kron(np.eye(28), np.full((1, 4), 0.25)), atol=1e-7)
  m = D._area_matrix(10, 3)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  np.testing.assert_allclose(m[0, :4], np.array([3, 3, 3, 1]) / 10, atol=1e-6)
  const = jnp.full((2, 24, 24, 3), -0.4)
  y = D.degrade(const, None, 7, mode="area", blur="none")
  np.testing.assert_allclose(np.asarray(y), -0.4, atol=1e-6)


def test_random_blur_sigma_per_sample():
  # Same image twice: different sigmas give different results; blur=none leaves it alone.
  x = jnp.concatenate([images(b=1, s=24, seed=5)] * 2)
  y = np.asarray(D.degrade(x, jax.random.PRNGKey(7), 24, blur="random", sigma_range=(0.3, 3.0)))
  assert not np.allclose(y[0], y[1])
  np.testing.assert_allclose(np.asarray(D.degrade(x, None, 24, blur="none")), np.asarray(x))


def test_make_degrade():
  x = images(b=2, seed=6)
  fn = D.make_degrade({"sizes": [14], "mode": "official", "blur": "official"})
  np.testing.assert_array_equal(np.asarray(fn(x, None)), np.asarray(D.degrade(x, None, 14)))
  with pytest.raises(ValueError, match="sizes"):
    D.make_degrade({})


def test_errors():
  x = images(b=1, s=32)
  with pytest.raises(ValueError, match=r"size 56 .*input size 32x32") as e:
    D.degrade(x, None, [14, 56])
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="mode 'lanczos'"):
    D.degrade(x, None, 14, mode="lanczos")
  with pytest.raises(ValueError, match="rng is None"):
    D.degrade(x, None, [8, 16])
