"""Model checkpoints that evaluation and student training (as a frozen teacher) load.

Two kinds of directory hold a model:
  * an exported model (written by `export_model`, e.g. by tools/convert.py):
        DIR/model.json     the model spec (architecture, depth, width, classes, margin...)
        DIR/variables/     orbax checkpoint of {'params', 'batch_stats'}
  * a training stage (written by the train loop): WORKDIR/<stage>/ with model.json and an
    orbax CheckpointManager under checkpoints/; `load_model` takes its latest complete step.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import orbax.checkpoint as ocp

from askd_jax.train.hashing import params_hash
from askd_jax.train.sharding import restore_replicated

SPEC_FILE = "model.json"


def write_spec(path: str, spec: Dict[str, Any]) -> None:
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, SPEC_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(path, SPEC_FILE))


def read_spec(path: str) -> Dict[str, Any]:
  f = os.path.join(path, SPEC_FILE)
  if not os.path.exists(f) and os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(
        f"{path} is a training stage that has not finished (checkpoints/ but no {SPEC_FILE} "
        "yet); run its training command again to finish it, or point at a finished stage")
  if not os.path.exists(f):
    raise FileNotFoundError(
        f"{path}: no {SPEC_FILE} here, so this is not an askd_jax model directory; "
        "point at a stage directory of a workdir (e.g. WORKDIR/teacher) or a directory "
        "written by `python -m askd_jax.tools.convert`")
  with open(f) as fh:
    try:
      return json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f}: not valid JSON ({e}); restore it or re-export the model") from e


def check_model_dir(path: str, what: str = "model directory ") -> None:
  """A one-line FileNotFoundError unless `path` is a directory (a .ckpt file: convert it)."""
  if os.path.isfile(path):
    raise FileNotFoundError(
        f"{what}{path} is a file, not a model directory; convert a PyTorch checkpoint first: "
        "python -m askd_jax.tools.convert --net=FILE --out=DIR, then give DIR")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}{path} does not exist; give a stage directory "
                            "(WORKDIR/teacher) or a directory written by askd_jax.tools.convert")


def export_model(path: str, variables: Dict[str, Any], spec: Dict[str, Any],
                 overwrite: bool = False) -> None:
  """Write {'params', 'batch_stats'} and the spec to `path` atomically (orbax)."""
  path = os.path.abspath(path)
  vdir = os.path.join(path, "variables")
  if os.path.exists(vdir) and not overwrite:
    raise FileExistsError(f"{path} already holds a model; choose another --out or pass "
                          "--overwrite to replace it")
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  spec = dict(spec, params_hash=params_hash(variables["params"]))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(vdir, variables, force=overwrite)
  ckptr.wait_until_finished()
  write_spec(path, spec)


def load_model(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Load (variables, spec) from an exported model or a training stage directory."""
  path = os.path.abspath(path)
  check_model_dir(path)
  spec = read_spec(path)
  vdir = os.path.join(path, "variables")
  if os.path.isdir(vdir):  # replicated on this run's devices, whatever layout wrote it
    variables = restore_replicated(vdir)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, spec
  ckdir = os.path.join(path, "checkpoints")
  from askd_jax.train import state_io  # local import: heavy and stage-specific
  if spec.get("trained_steps") is not None:  # a finished stage: its final step, nothing older
    return state_io.load_final_variables(path, int(spec["trained_steps"]),
                                         spec.get("variables_hash")), spec
  if os.path.isdir(ckdir):  # a stage written before model.json named its final step
    return state_io.load_latest_variables(ckdir), spec
  raise FileNotFoundError(f"{path}: holds {SPEC_FILE} but neither variables/ nor checkpoints/; "
                          "the model was never saved there")
