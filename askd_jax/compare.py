"""A grid of runs (identity splits x seeds) of one config, then one report over them.

`python -m askd_jax.main --config=configs/facerec.py:compare --workdir=W` comes here (the
config has a `grid` block): for each seed, for each split, WORKDIR/split<k>_seed<s> is an
ordinary run of askd_jax.experiment.run (teacher + students, resumable, finished stages
skipped) with config.data.split = k and config.seed = s. W/results.md, .json, .png are written by
askd_jax.stats over the finished runs; run the same command again to resume or to add runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence


def _ints(values, field: str) -> List[int]:
  """(0, 1), 1 or ('0,1',) (a --config override of a tuple) -> [0, 1]."""
  if isinstance(values, (str, int)):
    values = (values,)
  out = []
  for v in values:
    for part in (str(v).split(",") if isinstance(v, str) else [v]):
      try:
        out.append(int(part))
      except (TypeError, ValueError):
        raise ValueError(f"config.{field}={values!r} must be integers, e.g. "
                         f"--config.{field}=0,1") from None
  if not out or len(set(out)) != len(out):
    raise ValueError(f"config.{field}={values!r} must name at least one value, each once")
  return out


def run_dirs(workdir: str, splits: Sequence[int], seeds: Sequence[int]) -> List[str]:
  """The runs' workdirs, in the order they are trained (seed-major: every split of seed 0
  first, so a stopped grid already covers every split)."""
  return [os.path.join(workdir, f"split{k}_seed{s}") for s in seeds for k in splits]


def run_grid(cfg, workdir: str, overwrite: bool = False,
             run_one: Optional[Callable[..., Any]] = None) -> str:
  """Every run of the grid, then the report over them; returns its markdown.
  run_one(sub_cfg, sub_workdir, overwrite) trains one run (default: askd_jax.experiment.run)."""
  from askd_jax import report, stats
  if run_one is None:
    from askd_jax.experiment import run as run_one
  splits = _ints(cfg.grid.splits, "grid.splits")
  seeds = _ints(cfg.grid.seeds, "grid.seeds")
  t0 = time.time()
  dirs = run_dirs(workdir, splits, seeds)
  os.makedirs(workdir, exist_ok=True)
  for i, d in enumerate(dirs):
    split, seed = splits[i % len(splits)], seeds[i // len(splits)]
    sub = cfg.copy_and_resolve_references()
    with sub.unlocked():
      del sub["grid"]
      sub.seed = seed
      sub.data.split = split
    print(f"=== run {i + 1}/{len(dirs)}: split {split}, seed {seed} -> {d}", flush=True)
    run_one(sub, d, overwrite)
  elapsed = time.time() - t0
  run_s = []
  for d in dirs:
    with open(os.path.join(d, "results.json")) as f:
      run_s.append(json.load(f)["meta"].get("elapsed_s") or 0.0)
  notes = [
      f"Config `{cfg.get('preset')}`: {len(splits)} identity split(s) {splits} of "
      f"{cfg.data.get('num_splits')} x seed(s) {seeds}; methods "
      f"{', '.join(cfg.student.methods)}; students at {', '.join(map(str, cfg.student.sizes))} "
      f"px; {cfg.train.epochs} epochs ({cfg.train.steps or 'epochs'} steps).",
      "",
      "Each run is one (split, seed): its students share its teacher, so differences to "
      "no distillation are paired within a run.",
      "",
      f"This command's wall time: {elapsed / 60:.1f} min; the runs' own times (each its "
      f"last invocation): {sum(run_s) / 60:.1f} min in all. Command: `python -m askd_jax.main "
      + " ".join(a for a in sys.argv[1:]) + "`.",
  ]
  md = stats.write_report(workdir, dirs, report.METHOD_NAMES,
                          title=f"Method comparison: {cfg.get('preset')}", notes=notes)
  print("\n" + md)
  print(f"wrote {os.path.join(workdir, 'results.md')}, results.json, results.png")
  return md
