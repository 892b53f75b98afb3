"""MODEL_DIR/eval.json: every evaluation of the weights in that directory, side by side,
and the one a deployed model takes its verification thresholds from.

    {"format": 2,
     "weights": "<weights_hash: the parameters AND the BatchNorm statistics evaluated>",
     "evaluations": [                                   # oldest first
       {"key": "<config>-<data>-<dtype>",
        "config": "<experiment.eval_fingerprint: protocol, sets, pairs, degradation>",
        "data": "<data.prepared.prepared_identity of the prepared sets read, or null>",
        "dtype": "float32", "preset": "casia",
        "results": {"HR": {"lfw": {"accuracy", "std", "threshold", "tar_far1e-2"}},
                    "14": {...}}}]}

An evaluation under another config, on another copy of the data or in another dtype adds an
entry; one with the same key adds resolutions to it. Reading is tolerant: a missing, corrupt,
wrongly-typed or older-format file, or one written for other weights (a model directory
whose weights were replaced, e.g. by `tools.convert --overwrite`), is an empty cache: the
model is evaluated again and the file rewritten. JSON only: no JAX at import.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

FILE = "eval.json"
FORMAT = 2
HINT = " (name one with --evaluation=KEY)"


def weights_hash(variables) -> str:
  """The hash of what an evaluation ran: parameters and BatchNorm statistics."""
  from askd_jax.train.hashing import params_hash
  return params_hash({"params": variables["params"],
                      "batch_stats": variables.get("batch_stats", {})})


def empty(weights: Optional[str] = None) -> Dict[str, Any]:
  return {"format": FORMAT, "weights": weights, "evaluations": []}


def read(path: str, weights: Optional[str] = None) -> Dict[str, Any]:
  """The file's {"format", "weights", "evaluations"}; `empty(weights)` when it is missing,
  unreadable, not this format, or (`weights` given) written for other weights. Entries that
  are not well-formed are dropped."""
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, ValueError):  # ValueError: JSON or UTF-8 decoding
    return empty(weights)
  if (not isinstance(doc, dict) or doc.get("format") != FORMAT
      or not isinstance(doc.get("evaluations"), list)
      or (weights is not None and doc.get("weights") != weights)):
    return empty(weights)
  evs = [e for e in doc["evaluations"] if isinstance(e, dict) and isinstance(e.get("key"), str)
         and isinstance(e.get("results"), dict)
         and all(isinstance(v, dict) for v in e["results"].values())]
  return {"format": FORMAT, "weights": doc.get("weights"), "evaluations": evs}


def entry(doc: Dict[str, Any], key: str, **about) -> Dict[str, Any]:
  """The evaluation stored under `key`, moved last (the newest); a new one with `about`
  (config, data, dtype, preset) and no results when there is none."""
  evs = doc["evaluations"]
  found = next((e for e in evs if e["key"] == key), None)
  if found is None:
    found = {"key": key, **about, "results": {}}
  else:
    evs.remove(found)
  evs.append(found)
  return found


def describe(e: Dict[str, Any]) -> str:
  return (f"{e['key']} (preset {e.get('preset')}, {e.get('dtype')}, at "
          f"{', '.join(e['results']) or 'no resolution'})")


def select(doc: Dict[str, Any], config: Optional[str] = None, dtype: Optional[str] = None,
           name: Optional[str] = None) -> Tuple[Optional[Dict[str, Any]], str]:
  """(the entry a model's thresholds come from, '' or why there is none; '' when the file
  holds no evaluation at all).

  name: an entry's key, the start of one, or a preset; the newest match. Else the newest
  entry in `dtype` (None: any) of `config` (the eval_fingerprint of the model's training
  config); with no training config known (a converted checkpoint), the newest entry in
  `dtype` when all of those share one config."""
  evs = doc["evaluations"]
  if not evs:
    return None, "" if not name else f"no evaluation named {name!r}; it holds none"
  if name:
    hits = [e for e in evs if e["key"].startswith(name) or e.get("preset") == name]
    if not hits:
      return None, (f"no evaluation named {name!r}; it holds "
                    + "; ".join(describe(e) for e in evs))
    return hits[-1], ""
  hits = [e for e in evs if dtype in (None, e.get("dtype"))]
  if config is not None:
    hits = [e for e in hits if e.get("config") == config]
    if not hits:
      return None, (f"no evaluation in {dtype} under the config it was trained with; it holds "
                    + "; ".join(describe(e) for e in evs) + HINT)
  elif len({e.get("config") for e in hits}) > 1:
    return None, ("evaluations under several configs, and no training config to choose "
                  "by: " + "; ".join(describe(e) for e in hits) + HINT)
  if not hits:
    return None, (f"no evaluation in {dtype}; it holds "
                  + "; ".join(describe(e) for e in evs) + HINT)
  return hits[-1], ""
