"""Bad configs and bad flags: one line naming the field and the fix, before any work starts.

In-process cases call `config_check.validate` on the demo config with one field broken;
the CLI cases run `python -m askd_jax.main` and check the `error: ...` line, the exit code 2,
and that the workdir was never created (nothing ran). docs/reliability.md lists them all.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from askd_jax import config_check
from askd_jax.config_check import ConfigError

REPO = Path(__file__).resolve().parents[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("facerec_config", REPO / "configs" / "facerec.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("demo")


def _set(path: str, value):
  def edit(cfg):
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    with cfg.unlocked():
      node[leaf] = value
  return edit


def _error(cfg) -> str:
  with pytest.raises(ConfigError) as e:
    config_check.validate(cfg)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_demo_and_presets_are_valid():
  config_check.validate(demo_config())


# (field edit, what the message must name: the field, the bad value, the fix)
CASES = [
    ("unknown_method", _set("student.methods", ("askd", "bogus")),
     ["config.student.methods", "'bogus'", "choose from askd, at, fkd, horkd, none"]),
    ("no_method", _set("student.methods", ()), ["config.student.methods is empty"]),
    ("size_gt_input", _set("student.sizes", (7, 200)),
     ["config.student.sizes has 200", "data.image_size=56", "lower it"]),
    ("size_zero", _set("student.sizes", (0,)), ["config.student.sizes has 0"]),
    ("negative_lr", _set("train.lr", -0.1), ["config.train.lr=-0.1", "> 0"]),
    ("nan_lr", _set("train.lr", float("nan")), ["config.train.lr=nan", "finite"]),
    ("zero_batch", _set("train.batch_size", 0), ["config.train.batch_size=0", "positive"]),
    ("bad_dtype", _set("dtype", "float64"), ["config.dtype='float64'", "float32, bfloat16"]),
    ("bad_eval_dtype", _set("eval.dtype", "fp32"), ["config.eval.dtype='fp32'", "float32",
                                                    "train"]),
    ("bad_nan_policy", _set("train.nan_policy", "ignore"),
     ["config.train.nan_policy='ignore'", "stop, skip"]),
    ("unknown_task", _set("task", "segmentation"), ["config.task='segmentation'", "facerec"]),
    ("bad_depth", lambda c: (_set("model.stage_sizes", ())(c), _set("model.depth", 34)(c)),
     ["config.model.depth=34", "50, 100, 152"]),
    ("bad_stage_sizes", _set("model.stage_sizes", (1, 1, 1)),
     ["config.model.stage_sizes=(1, 1, 1)", "4 positive integers"]),
    ("bad_margin", _set("model.margin", "sphereface"), ["config.model.margin", "arcface, cosface"]),
    ("bad_width", _set("model.width", 0.0), ["config.model.width=0.0", "> 0"]),
    ("bad_dropout", _set("model.dropout", 1.0), ["config.model.dropout=1.0", "[0, 1)"]),
    ("bad_schedule", _set("train.schedule", "linear"), ["config.train.schedule", "step, cosine"]),
    ("no_epochs", lambda c: (_set("train.epochs", 0)(c), _set("train.steps", 0)(c)),
     ["config.train.epochs=0", "config.train.steps"]),
    ("negative_steps", _set("train.steps", -5), ["config.train.steps=-5", ">= 0"]),
    ("keep_zero", _set("train.keep", 0), ["config.train.keep=0", "> 0"]),
    ("negative_ckpt_every", _set("train.checkpoint_every", -1), ["config.train.checkpoint_every"]),
    ("boundaries_unsorted", _set("train.lr_boundaries", (11, 6)),
     ["config.train.lr_boundaries=(11, 6)", "increasing"]),
    ("bad_momentum", _set("train.momentum", 1.5), ["config.train.momentum=1.5", "[0, 1)"]),
    ("image_too_big", _set("data.image_size", 200), ["config.data.image_size=200", "[8, 112]"]),
    ("bad_augment", _set("data.augment", "heavy"), ["config.data.augment='heavy'", "flip"]),
    ("bad_num_pairs", _set("data.num_pairs", 33), ["config.data.num_pairs=33", "multiple of 20"]),
    ("unknown_dataset_kind", _set("data.name", "imagenet21k"), ["config.data.name", "orl"]),
    ("bad_resize_mode", _set("student.mode", "nearest2"), ["config.student.mode", "official"]),
    ("bad_blur", _set("student.blur", "gauss"), ["config.student.blur", "random"]),
    ("bad_sigma_range", _set("student.sigma_range", (2.0, 0.1)),
     ["config.student.sigma_range", "low <= high"]),
    ("negative_distill_weight", _set("distill.askd.weight", -1.0),
     ["config.distill.askd.weight=-1.0", ">= 0"]),
    ("bad_eval_batch", _set("eval.batch_size", 0), ["config.eval.batch_size=0"]),
    ("negative_workers", _set("data.workers", -1), ["config.data.workers=-1", ">= 0"]),
    ("no_prefetch", _set("data.prefetch", 0), ["config.data.prefetch=0", "integer > 0"]),
]


@pytest.mark.parametrize("name,edit,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_field_is_one_line_naming_field_and_fix(name, edit, expect):
  cfg = demo_config()
  edit(cfg)
  msg = _error(cfg)
  for e in expect:
    assert e in msg, (e, msg)


def test_missing_data_dirs(tmp_path):
  cfg = demo_config()
  _set("data.name", "insightface")(cfg)
  msg = _error(cfg)
  assert "config.data.manual_dir is empty" in msg and "--config.data.manual_dir=" in msg
  _set("data.manual_dir", str(tmp_path / "casia"))(cfg)
  msg = _error(cfg)
  assert f"config.data.manual_dir='{tmp_path / 'casia'}' does not exist" in msg
  assert "docs/datasets.md" in msg
  (tmp_path / "casia").mkdir()
  config_check.validate(cfg)


def test_comma_separated_methods_and_sizes_are_split():
  cfg = demo_config()
  _set("student.methods", ("none,askd",))(cfg)
  _set("student.sizes", ("7,14",))(cfg)
  config_check.normalize(cfg)
  assert tuple(cfg.student.methods) == ("none", "askd")
  assert tuple(cfg.student.sizes) == (7, 14)
  config_check.validate(cfg)


def test_load_config_parses_overrides_as_the_cli_does():
  """experiment.load_config (notebooks, tests, the grid) applies --config.* overrides through
  ml_collections' config flag as main.py does: the last value of a field wins, tuples too;
  the preset after ':' is honoured; anything else is refused with the argument named."""
  from askd_jax import experiment
  from askd_jax.failures import UsageError
  cfg = experiment.load_config(f"--config={REPO / 'configs' / 'facerec.py'}:casia",
                               ["--config.student.sizes=7,", "--config.train.lr=0.3",
                                "--config.student.sizes=14,28", "--config.train.lr", "0.2"])
  assert cfg.preset == "casia" and cfg.data.name == "insightface"
  assert tuple(cfg.student.sizes) == (14, 28) and cfg.train.lr == 0.2
  with pytest.raises(UsageError, match="--workdir=w: load_config takes --config"):
    experiment.load_config(str(REPO / "configs" / "facerec.py"), ["--workdir=w"])
  with pytest.raises(AttributeError, match="no_such_field"):
    experiment.load_config(str(REPO / "configs" / "facerec.py"), ["--config.train.no_such_field=1"])


# --- the teacher a student distils from ----------------------------------------------------

def _teacher(tmp_path, **changes) -> str:
  cfg = demo_config()
  m = cfg.model
  spec = {"task": "facerec", "arch": "iresnet_cbam", "depth": m.depth, "width": m.width,
          "stage_sizes": list(m.stage_sizes), "embedding_dim": m.embedding_dim,
          "num_classes": 28, "margin": "arcface", "s": 32.0, "m": 0.5,
          "input_size": cfg.data.image_size, "channel_order": "rgb"}
  spec.update(changes)
  d = tmp_path / "teacher"
  d.mkdir()
  (d / "model.json").write_text(json.dumps(spec))
  return str(d)


def _with_teacher(path, methods=("askd",)):
  cfg = demo_config()
  _set("student.teacher", path)(cfg)
  _set("student.methods", methods)(cfg)
  return cfg


def test_matching_teacher_is_accepted(tmp_path):
  config_check.validate(_with_teacher(_teacher(tmp_path)))


@pytest.mark.parametrize("change,expect", [
    ({"stage_sizes": None, "depth": 100},
     ["has blocks=(3, 13, 30, 3)", "config.model.depth/model.stage_sizes gives (1, 1, 1, 1)"]),
    ({"input_size": 112}, ["has input_size=112", "config.data.image_size gives 56"]),
    ({"width": 1.0}, ["has width=1.0", "config.model.width gives 0.25"]),
    ({"arch": "resnet18"}, ["has arch='resnet18'"]),
    ({"embedding_dim": 512}, ["has embedding_dim=512", "config.model.embedding_dim gives 128"]),
    ({"task": "detection"}, ["has task='detection'"]),
], ids=["depth", "input_size", "width", "arch", "embedding", "task"])
def test_teacher_of_another_architecture_is_refused(tmp_path, change, expect):
  path = _teacher(tmp_path, **change)
  msg = _error(_with_teacher(path))
  assert msg.startswith(f"config.student.teacher={path!r}")
  assert "to match the teacher or point student.teacher at a matching checkpoint" in msg
  for e in expect:
    assert e in msg, (e, msg)


def test_teacher_depth_does_not_matter_without_distillation(tmp_path):
  config_check.validate(_with_teacher(_teacher(tmp_path, stage_sizes=None, depth=100), ("none",)))
  cfg = _with_teacher(str(tmp_path / "teacher"), ("none",))
  _set("data.image_size", 28)(cfg)  # the input size always matters
  assert "has input_size=56" in _error(cfg)


def test_teacher_missing_unreadable_or_not_a_model(tmp_path):
  msg = _error(_with_teacher(str(tmp_path / "nowhere")))
  assert "config.student.teacher=" in msg and "does not exist" in msg and "convert" in msg
  (tmp_path / "empty").mkdir()
  msg = _error(_with_teacher(str(tmp_path / "empty")))
  assert "no model.json here" in msg and "askd_jax.tools.convert" in msg
  path = _teacher(tmp_path)
  Path(path, "model.json").write_text('{"task": "facerec", "arch": ')  # cut short
  msg = _error(_with_teacher(path))
  assert "model.json: not valid JSON" in msg and "re-export" in msg
  Path(path, "model.json").write_text("[1, 2]")
  assert "not a model spec" in _error(_with_teacher(path))


# --- the CLI: flags and config errors print one line, exit 2, nothing runs ----------------------

def _cli(tmp_path, *args, env=None):
  w = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "askd_jax.main", f"--workdir={w}", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert not w.exists()  # refused before the workdir, the data or a compile was touched
  return lines[0]


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/facerec.py:bogus"],
     "error: --config=configs/facerec.py:bogus: preset 'bogus' is unknown; use demo, compare, casia or "
     "tinyface"),
    (["--config=configs/nope.py"], "configs/nope.py"),
    (["--config.train.lrr=0.1"],
     'error: --config.train.lrr=0.1: the config has no field \'lrr\' (did you mean "lr"?)'),
    (["--config.train.steps=1.5"], "error: --config.train.steps=1.5: invalid literal for int()"),
    (["--config.student.methods=none,bogus"], "error: config.student.methods has 'bogus'"),
    (["--config.student.sizes=7,500"], "error: config.student.sizes has 500"),
], ids=["preset", "config_file", "unknown_field", "field_type", "method", "size"])
def test_cli_flag_and_config_errors(tmp_path, args, expect):
  line = _cli(tmp_path, *args)
  assert line.startswith(expect) or expect in line, line


def test_cli_batch_not_divisible_by_devices(tmp_path):
  line = _cli(tmp_path, "--config.train.batch_size=7",
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert line == ("error: config.train.batch_size=7 is not divisible by the 2 devices; use a "
                  "multiple of 2, e.g. 6")
