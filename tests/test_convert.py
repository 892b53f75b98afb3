"""The checkpoint converter: the pure mapping, the CLI round trip, and its one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.models import ArcFace, MarginModel, iresnet_cbam
from askd_jax.tools import convert

SMALL = dict(stage_sizes=(1, 2, 1, 1), width=0.25)


def _random_variables(model, x_shape, labels, seed=0):
  """Random values of the right shapes, without running a (slow) init on the CPU."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), labels))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def test_mapping_round_trip_without_torch():
  """Flax -> official layout -> Flax is the identity, for both channel orders."""
  model = MarginModel(iresnet_cbam(**SMALL), ArcFace(num_classes=5))
  variables = _random_variables(model, (1, 56, 56, 3), jnp.zeros((1,), jnp.int32))
  for order in ("rgb", "bgr"):
    state, margin = convert.flax_to_torch_state(variables, channel_order=order)
    assert state["output_layer.3.weight"].shape == (512, 128 * 4 * 4)  # (D, C*H*W), 56 px
    assert state["layer1.0.channel_layer.shared_mlp.0.weight"].shape == (1, 16, 1, 1)
    assert "layer1.1.shortcut_layer.0.weight" not in state  # dim_match blocks: identity
    back, arch = convert.torch_state_to_flax(state, margin, channel_order=order)
    assert arch["stage_sizes"] == SMALL["stage_sizes"] and arch["width"] == 0.25
    assert arch["out_hw"] == 4 and arch["num_classes"] == 5 and arch["depth"] is None
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)
  rgb, _ = convert.flax_to_torch_state(variables, "rgb")
  bgr, _ = convert.flax_to_torch_state(variables, "bgr")
  np.testing.assert_array_equal(rgb["input_layer.0.weight"], bgr["input_layer.0.weight"][:, ::-1])


def test_flatten_permutation_is_nchw_to_nhwc():
  """Entry (d, c*H*W + h*W + w) of the torch Linear is kernel row h*W*C + w*C + c."""
  d, c, hw = 3, 5, 2
  w = np.arange(d * c * hw * hw, dtype=np.float32).reshape(d, c * hw * hw)
  k = convert._to_flax("linear_nchw", (d, c, hw), {"weight": w, "bias": np.zeros(d)})
  k = k["params"]["kernel"]
  for dd, cc, hh, ww in [(0, 0, 0, 0), (2, 4, 1, 1), (1, 3, 0, 1), (2, 1, 1, 0)]:
    assert k[hh * hw * c + ww * c + cc, dd] == w[dd, cc * hw * hw + hh * hw + ww]


def test_expected_shapes_of_official_r50():
  shapes = convert.expected_torch_shapes((3, 4, 14, 3), (64, 128, 256, 512))
  assert shapes["input_layer.0.weight"] == (64, 3, 3, 3)
  assert shapes["input_layer.2.weight"] == (64,)
  assert shapes["layer1.0.res_layer.1.weight"] == (64, 64, 3, 3)
  assert shapes["layer2.0.shortcut_layer.0.weight"] == (128, 64, 1, 1)
  assert shapes["layer3.13.channel_layer.shared_mlp.2.weight"] == (256, 16, 1, 1)
  assert shapes["layer4.2.spatial_layer.conv.weight"] == (1, 2, 3, 3)
  assert shapes["output_layer.3.weight"] == (512, 25088)
  assert shapes["output_layer.4.running_var"] == (512,)
  assert "layer3.14.res_layer.0.weight" not in shapes and "layer2.1.shortcut_layer.0.weight" \
      not in shapes


# ---------------------------------------------------------------------------------------
# With torch: real .ckpt files.

@pytest.fixture(scope="module")
def official(tmp_path_factory):
  torch = pytest.importorskip("torch", reason="reading .ckpt files needs torch (optional)")
  from askd_jax.tools import torch_reference as tr

  torch.manual_seed(0)
  net = tr.randomize_(tr.iresnet_cbam(**SMALL, input_size=56), seed=3).eval()
  margin = tr.ArcMarginProduct(512, 7)
  d = tmp_path_factory.mktemp("ckpt")
  paths = {"net": str(d / "last_net.ckpt"), "margin": str(d / "last_margin.ckpt")}
  torch.save({"iters": 10, "net_state_dict": net.state_dict()}, paths["net"])
  torch.save({"iters": 10, "net_state_dict": margin.state_dict()}, paths["margin"])
  return torch, net, margin, paths


def _run(argv, capsys):
  rc = convert.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_round_trip(official, tmp_path, capsys):
  from askd_jax.train.checkpoint import load_model

  torch, net, margin, paths = official
  out_dir = str(tmp_path / "model")
  rc, out, err = _run([f"--net={paths['net']}", f"--margin={paths['margin']}",
                       f"--out={out_dir}", "--input_size=56"], capsys)
  assert rc == 0, err
  assert "wrote" in out and out_dir in out
  variables, spec = load_model(out_dir)
  assert spec["task"] == "facerec" and spec["arch"] == "iresnet_cbam"
  assert spec["stage_sizes"] == [1, 2, 1, 1] and spec["width"] == 0.25 and spec["depth"] is None
  assert spec["num_classes"] == 7 and spec["embedding_dim"] == 512
  assert spec["margin"] == "arcface" and (spec["s"], spec["m"]) == (32.0, 0.5)
  assert spec["input_size"] == 56 and spec["channel_order"] == "rgb"
  assert spec["source"] == os.path.abspath(paths["net"])

  model = MarginModel(iresnet_cbam(stage_sizes=spec["stage_sizes"], width=spec["width"]),
                      ArcFace(num_classes=spec["num_classes"], s=spec["s"], m=spec["m"]))
  bgr = np.random.RandomState(1).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32)
  labels = np.array([2, 6])
  with torch.no_grad():
    emb_t, _ = net(torch.from_numpy(bgr))
    logits_t = margin(emb_t, torch.from_numpy(labels))
  rgb = jnp.asarray(bgr[:, ::-1].transpose(0, 2, 3, 1))  # the converted model eats RGB
  out_j, _ = jax.jit(model.apply)(variables, rgb, jnp.asarray(labels))
  assert np.max(np.abs(np.asarray(out_j["embedding"]) - emb_t.numpy())) <= 1e-4
  assert np.max(np.abs(np.asarray(out_j["logits"]) - logits_t.numpy())) <= 1e-4

  # An existing output is not silently replaced ...
  rc, _, err = _run([f"--net={paths['net']}", f"--out={out_dir}"], capsys)
  assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
  # ... unless asked; --channel_order=bgr keeps the official stem and says so in the spec.
  rc, _, err = _run([f"--net={paths['net']}", f"--out={out_dir}", "--overwrite",
                     "--channel_order=bgr", "--input_size=64"], capsys)
  assert rc == 0, err
  variables_bgr, spec_bgr = load_model(out_dir)
  assert spec_bgr["channel_order"] == "bgr" and spec_bgr["num_classes"] is None
  assert spec_bgr["input_size"] == 64 and "head" not in variables_bgr["params"]
  np.testing.assert_array_equal(
      np.asarray(variables_bgr["params"]["backbone"]["stem_conv"]["kernel"]),
      np.asarray(variables["params"]["backbone"]["stem_conv"]["kernel"])[:, :, ::-1])


def test_bare_and_dataparallel_state_dicts(official, tmp_path):
  torch, net, _, paths = official
  bare, prefixed = str(tmp_path / "bare.ckpt"), str(tmp_path / "dp.ckpt")
  torch.save(net.state_dict(), bare)
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, prefixed)
  ref, _ = convert.torch_state_to_flax(convert.load_torch_state(paths["net"]))
  for p in (bare, prefixed):
    got, _ = convert.torch_state_to_flax(convert.load_torch_state(p))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)


def _broken(torch, net, path, edit):
  """Save the official checkpoint after `edit` (numpy values become tensors)."""
  sd = dict(net.state_dict())
  edit(sd)
  sd = {k: torch.from_numpy(v.astype(np.float32)) if isinstance(v, np.ndarray) else v
        for k, v in sd.items()}
  torch.save({"iters": 1, "net_state_dict": sd}, path)
  return path


@pytest.mark.parametrize("case,edit,expect", [
    ("missing", lambda sd: sd.pop("layer2.1.res_layer.2.running_var"),
     ["missing tensor 'layer2.1.res_layer.2.running_var'", "(32,)"]),
    ("extra", lambda sd: sd.__setitem__("layer1.0.extra_layer.weight", np.zeros(3)),
     ["unexpected tensor 'layer1.0.extra_layer.weight'", "(3,)"]),
    ("shape", lambda sd: sd.__setitem__("layer3.0.res_layer.4.weight", np.zeros((64, 64, 1, 1))),
     ["'layer3.0.res_layer.4.weight'", "shape (64, 64, 1, 1)", "expected (64, 64, 3, 3)"]),
    ("fc_shape", lambda sd: sd.__setitem__("output_layer.3.weight", np.zeros((512, 1000))),
     ["'output_layer.3.weight'", "(512, 1000)"]),
])
def test_wrong_checkpoint_gives_one_line_error(official, tmp_path, capsys, case, edit, expect):
  torch, net, _, _ = official
  path = _broken(torch, net, str(tmp_path / f"{case}.ckpt"), edit)
  rc, out, err = _run([f"--net={path}", f"--out={tmp_path / 'out'}"], capsys)
  assert rc == 2 and out == ""
  assert len(err.strip().splitlines()) == 1, err
  assert path in err
  for e in expect:
    assert e in err, (e, err)
  assert not os.path.exists(tmp_path / "out")  # nothing written


def test_wrong_depth_and_margin(official, tmp_path, capsys):
  torch, net, _, paths = official
  rc, _, err = _run([f"--net={paths['net']}", "--depth=50", f"--out={tmp_path / 'a'}"], capsys)
  # depth 50 wants 3 blocks in layer1; the file has 1.
  assert rc == 2 and "missing tensor 'layer1.1.res_layer.0.weight'" in err
  assert "more problems" in err and len(err.strip().splitlines()) == 1
  bad_margin = str(tmp_path / "margin.ckpt")
  torch.save({"net_state_dict": {"weight": torch.zeros(7, 128)}}, bad_margin)
  rc, _, err = _run([f"--net={paths['net']}", f"--margin={bad_margin}",
                     f"--out={tmp_path / 'b'}"], capsys)
  assert rc == 2 and bad_margin in err and "'weight'" in err and "(7, 128)" in err
  assert "expected (7, 512)" in err


def test_not_a_checkpoint(official, tmp_path, capsys):
  path = tmp_path / "notes.ckpt"
  path.write_text("this is not a checkpoint\n")
  rc, _, err = _run([f"--net={path}", f"--out={tmp_path / 'out'}"], capsys)
  assert rc == 2 and str(path) in err and "not a PyTorch checkpoint" in err
  assert len(err.strip().splitlines()) == 1
  rc, _, err = _run([f"--net={tmp_path / 'absent.ckpt'}", f"--out={tmp_path / 'out'}"], capsys)
  assert rc == 2 and "absent.ckpt: no such file" in err


def test_cli_subprocess_error_is_one_line(tmp_path):
  pytest.importorskip("torch", reason="reading .ckpt files needs torch (optional)")
  path = tmp_path / "garbage.ckpt"
  path.write_bytes(os.urandom(64))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "askd_jax.tools.convert", f"--net={path}",
                         f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                        cwd=root, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and str(path) in proc.stderr
  assert "Traceback" not in proc.stderr
