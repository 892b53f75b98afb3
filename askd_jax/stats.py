"""Statistics over several runs (seeds, identity splits): every multi-run report uses this.

A run is one workdir's results.json (rows: method, eval_resolution, set, accuracy, ...). Its
students share the run's teacher, split and seed, so the runs pair the methods:

  cell        per (set, metric, method, resolution): mean over runs, 95 % Student-t interval
              mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with ddof=1).
  difference  per (set, metric, method, resolution), method vs `none` at the same resolution
              within each run: d_r = x_r(method) - x_r(none); mean d, 95 % paired-t interval,
              the paired t-test's two-sided p (scipy.stats.ttest_rel; None when every d_r is
              the same) and the exact paired sign-flip permutation test's two-sided p
              (`p_signflip`: the share of the 2^n sign patterns of the d_r whose |mean| reaches
              the observed one; scipy.stats.permutation_test). A difference is significant
              when p_signflip <= 0.05 and its t interval, where it has a width, excludes 0;
              `holm` also says whether it stays so after Holm's correction of the sign-flip
              p over the differences of its (set, metric) table.

Why the sign-flip test beside the t interval: when every run gives the same difference (2-4
runs on a 1/900 accuracy grid do), the t interval has zero width and the t-test's p is 0, yet
n runs that agree are evidence of p = 2 / 2^n only. The sign-flip p needs no variance and no
normality, and it cannot go below 2 / 2^n: a difference needs at least 6 runs to reach
p <= 0.05 (2/32 = 0.0625 with 5), and 9 to survive Holm over a table of 8 differences
(2/256 = 0.0078 > 0.05/8). A zero-width interval is printed as "all n runs equal", never as
an interval.

Why the paired t and not a bootstrap: with 3-8 runs the percentile bootstrap's intervals are
too narrow (it cannot see more spread than the few runs show), while the t interval is exact
for normal run-to-run noise and close to it otherwise (tests/test_stats.py: coverage).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
from scipy import stats as sps

METRICS = {"accuracy": "verification accuracy (%)", "tar_far1e-2": "TAR at FAR 1e-2 (%)"}
BASELINE = "none"
ALPHA = 0.05


@dataclasses.dataclass
class Interval:
  mean: float
  lo: float
  hi: float
  n: int
  p: float | None = None  # paired t-test's two-sided p of mean == 0 (differences only)
  p_signflip: float | None = None  # exact sign-flip test's two-sided p (differences only)

  @property
  def zero_width(self) -> bool:
    return self.n > 1 and self.lo == self.hi

  @property
  def significant(self) -> bool:
    """For differences: the sign-flip p <= ALPHA and the t interval, if it has a width,
    excludes 0. Without a sign-flip p (a cell): the interval excludes 0 and has a width."""
    if self.n < 2:
      return False
    excludes = self.zero_width or self.lo > 0 or self.hi < 0
    if self.p_signflip is None:
      return excludes and not self.zero_width
    return excludes and self.p_signflip <= ALPHA


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Mean and its Student-t interval; with one value the interval is (nan, nan)."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"t_interval needs a non-empty 1-D sequence, got shape {x.shape}")
  m = float(np.mean(x))
  if x.size < 2:
    return Interval(m, math.nan, math.nan, 1)
  sem = float(np.std(x, ddof=1)) / math.sqrt(x.size)
  if sem <= 1e-12:  # equal values up to rounding: no spread to scale
    return Interval(m, m, m, int(x.size))
  lo, hi = sps.t.interval(confidence, x.size - 1, loc=m, scale=sem)
  return Interval(m, float(lo), float(hi), int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> Interval:
  """mean(a - b) with the paired-t interval and p; a[i], b[i] come from the same run."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
  iv = t_interval(a - b, confidence)
  if iv.n > 1:
    iv.p_signflip = sign_flip_p(a - b)
    if not iv.zero_width:  # every run the same difference: the t-test has no variance to use
      iv.p = float(sps.ttest_rel(a, b).pvalue)
  return iv


def sign_flip_p(d: Sequence[float], exact_up_to: int = 16) -> float:
  """Two-sided p of the paired sign-flip permutation test of mean(d) == 0: exact (all 2^n
  sign patterns) up to `exact_up_to` runs, 99,999 seeded random patterns beyond."""
  d = np.asarray(d, np.float64)
  d = np.where(np.abs(d) <= 1e-12, 0.0, d)  # float noise of equal accuracies is no sign
  if not np.any(d):
    return 1.0
  exact = d.size <= exact_up_to
  r = sps.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                           n_resamples=np.inf if exact else 99_999, alternative="two-sided",
                           rng=None if exact else np.random.default_rng(0))
  return float(min(1.0, r.pvalue))


def welch_difference(a: Sequence[float], b: Sequence[float],
                     confidence: float = 0.95) -> Interval:
  """mean(a) - mean(b) with Welch's unpaired interval: what ignoring the pairing gives."""
  r = sps.ttest_ind(a, b, equal_var=False)
  ci = r.confidence_interval(confidence)
  return Interval(float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high),
                  min(len(a), len(b)), float(r.pvalue))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> List[bool]:
  """Holm's step-down: which hypotheses are rejected at family-wise level alpha."""
  order = np.argsort(pvalues)
  out = [False] * len(pvalues)
  for rank, i in enumerate(order):
    if pvalues[i] > alpha / (len(pvalues) - rank):
      break
    out[i] = True
  return out


# --- runs -> tables -----------------------------------------------------------------------

def res_key(r: str) -> tuple:
  """HR first, then sizes from large to small (the order of the paper's columns)."""
  return (0, 0) if r == "HR" else (1, -int(str(r).split("/")[0]))


class SameRunError(ValueError):
  """Two of the workdirs given are one run or one experiment (same config and seed)."""


def distinct_runs(workdirs: Iterable[str]) -> List[str]:
  """The workdirs, each run once: a workdir named twice (W and W/, a link) is kept once;
  two workdirs holding the same experiment (the same config hash in config.json, seed and
  split included, and the same training data: a copy, or the same command run twice) are a
  SameRunError, since averaging them counts one result twice."""
  out, real, hashes = [], set(), {}
  for wd in workdirs:
    r = os.path.realpath(wd)
    if r in real:
      continue
    real.add(r)
    out.append(wd)
    try:
      with open(os.path.join(wd, "config.json")) as f:
        h = json.load(f).get("config_hash")
    except (OSError, ValueError, AttributeError):
      h = None
    data = _train_data(wd)
    same = [w for w, d in hashes.get(h, []) if None in (d, data) or d == data]
    if h is not None and same:  # a run whose stages record no data is taken as the same
      raise SameRunError(f"{same[0]} and {wd} hold the same experiment (config hash {h}: "
                         "same config, seed and split, and the same training data), so "
                         "averaging them would count one result twice; leave one out, or give "
                         "runs of other seeds (--config.seed=N) or splits")
    if h is not None:
      hashes.setdefault(h, []).append((wd, data))
  return out


def _train_data(workdir: str):
  """The content hash of the training data a run's first finished stage recorded (where the
  data lives is not in the config hash), or None."""
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    try:
      with open(os.path.join(workdir, name, "model.json")) as f:
        return (json.load(f).get("train_data") or {}).get("identity")
    except (OSError, ValueError, AttributeError):
      continue
  return None


def load_runs(workdirs: Iterable[str]) -> List[Tuple[str, List[Dict[str, Any]]]]:
  """[(workdir, rows)] from each distinct run's results.json (`distinct_runs`)."""
  out = []
  for wd in distinct_runs(workdirs):
    path = os.path.join(wd, "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: that run has not finished; run its "
                              "command again to resume it, or leave the workdir out")
    with open(path) as f:
      try:
        rows = json.load(f)["rows"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a run's results ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); run that run's command "
                         "again to write it anew (it only re-evaluates finished stages), or "
                         "leave the workdir out") from None
    out.append((wd, rows))
  return out


def summarize(runs: List[Tuple[str, List[Dict[str, Any]]]], baseline: str = BASELINE,
              confidence: float = 0.95) -> Dict[str, Any]:
  """{'cells': [...], 'diffs': [...], 'runs': [names]}: see the module docstring."""
  per: Dict[tuple, Dict[str, float]] = {}  # (set, metric, method, res) -> {run: value}
  for name, rows in runs:
    for r in rows:
      for metric in METRICS:
        if r.get(metric) is not None:
          per.setdefault((r["set"], metric, r["method"], str(r["eval_resolution"])),
                         {})[name] = float(r[metric])
  cells, diffs = [], []
  for (s, metric, method, res), vals in sorted(per.items()):
    iv = t_interval(list(vals.values()), confidence)
    cells.append({"set": s, "metric": metric, "method": method, "eval_resolution": res,
                  **dataclasses.asdict(iv), "values": vals})
    base = per.get((s, metric, baseline, res))
    if method in (baseline, "teacher") or not base:
      continue
    both = [n for n in vals if n in base]
    if not both:
      continue
    a, b = [vals[n] for n in both], [base[n] for n in both]
    iv = paired_difference(a, b, confidence)
    spread = len(both) > 1 and np.ptp(a) + np.ptp(b) > 1e-12  # Welch needs some variance
    unpaired = welch_difference(a, b, confidence) if spread else None
    diffs.append({"set": s, "metric": metric, "method": method, "eval_resolution": res,
                  **dataclasses.asdict(iv), "significant": iv.significant,
                  "unpaired": unpaired and {"lo": unpaired.lo, "hi": unpaired.hi}})
  for key in {(d["set"], d["metric"]) for d in diffs}:
    group = [d for d in diffs if (d["set"], d["metric"]) == key and d["p_signflip"] is not None]
    for d, rej in zip(group, holm([d["p_signflip"] for d in group], ALPHA)):
      d["holm"] = rej and d["significant"]
  return {"cells": cells, "diffs": diffs, "runs": [n for n, _ in runs],
          "confidence": confidence, "baseline": baseline}


def _pct(x: float, sign: bool = False) -> str:
  return "nan" if math.isnan(x) else f"{100 * x:{'+' if sign else ''}.2f}"


def _interval(c: Dict[str, Any], sign: bool = False) -> str:
  """'mean [lo, hi]', or 'mean (all n runs equal)': a zero-width interval is no interval."""
  if c["n"] > 1 and c["lo"] == c["hi"]:
    return f"{_pct(c['mean'], sign)} (all {c['n']} runs equal)"
  return f"{_pct(c['mean'], sign)} [{_pct(c['lo'], sign)}, {_pct(c['hi'], sign)}]"


def markdown(summary: Dict[str, Any], method_names: Dict[str, str]) -> str:
  """Tables: mean [95 % CI] per method and resolution, then paired differences to `none`."""
  cells, diffs = summary["cells"], summary["diffs"]
  n_runs = len(summary["runs"])
  conf = int(round(100 * summary["confidence"]))
  out = []
  order = [m for m in method_names if any(c["method"] == m for c in cells)]
  for s in sorted({c["set"] for c in cells}):
    for metric, label in METRICS.items():
      mine = [c for c in cells if c["set"] == s and c["metric"] == metric]
      if not mine:
        continue
      res = sorted({c["eval_resolution"] for c in mine}, key=res_key)
      head = "| method | " + " | ".join(f"{r} px" if r != "HR" else "HR" for r in res) + " |"
      out += [f"`{s}`, {label}: mean [{conf} % t interval] over runs (n = runs)", "",
              head, "|---|" + "---|" * len(res)]
      for m in order:
        row = []
        for r in res:
          c = next((c for c in mine if c["method"] == m and c["eval_resolution"] == r), None)
          row.append("" if c is None else f"{_interval(c)} (n={c['n']})")
        out.append(f"| {method_names[m]} | " + " | ".join(row) + " |")
      out.append("")
      dd = [d for d in diffs if d["set"] == s and d["metric"] == metric]
      if not dd:
        continue
      res = sorted({d["eval_resolution"] for d in dd}, key=res_key)
      out += [f"`{s}`, {label}: paired difference to "
              f"{method_names.get(summary['baseline'], summary['baseline'])} (points), "
              f"mean [{conf} % paired-t interval], paired-t p, exact sign-flip p; **bold** = "
              f"sign-flip p <= {ALPHA} and the interval excludes 0, \u2020 = also after "
              "Holm's correction of the sign-flip p over this table", "",
              "| method | " + " | ".join(f"{r} px" for r in res) + " |",
              "|---|" + "---|" * len(res)]
      for m in order:
        row = []
        for r in res:
          d = next((d for d in dd if d["method"] == m and d["eval_resolution"] == r), None)
          if d is None:
            row.append("")
            continue
          txt = _interval(d, True)
          p = "" if d["p"] is None else f" p={d['p']:.3f}"
          if d.get("p_signflip") is not None:
            p += f"{',' if p else ''} sign-flip p={d['p_signflip']:.3f}"
          row.append((f"**{txt}**" if d["significant"] else txt) + p
                     + (" \u2020" if d.get("holm") else ""))
        if any(row):
          out.append(f"| {method_names[m]} | " + " | ".join(row) + " |")
      ratio = [(d["hi"] - d["lo"]) / (d["unpaired"]["hi"] - d["unpaired"]["lo"]) for d in dd
               if d.get("unpaired") and d["unpaired"]["hi"] > d["unpaired"]["lo"]]
      if ratio:  # how much the pairing buys here
        out += ["", f"Median width of these paired intervals: {np.median(ratio):.2f}x that of "
                "the unpaired (Welch) intervals over the same runs."]
      out.append("")
  return "\n".join(out)


def plot(summary: Dict[str, Any], path: str, method_names: Dict[str, str]) -> None:
  """Per (set, metric): means with their intervals, and the paired differences with theirs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cells, diffs = summary["cells"], summary["diffs"]
  panels = [(s, m) for s in sorted({c["set"] for c in cells}) for m in METRICS
            if any(c["set"] == s and c["metric"] == m for c in cells)]
  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
  methods = [m for m in method_names if any(c["method"] == m for c in cells)]
  for (s, metric), (ax, axd) in zip(panels, axes):
    for ax_, src, title in ((ax, cells, METRICS[metric]),
                            (axd, diffs, f"difference to {summary['baseline']} (points, paired)")):
      mine = [c for c in src if c["set"] == s and c["metric"] == metric]
      res = sorted({c["eval_resolution"] for c in mine}, key=res_key, reverse=True)
      for k, m in enumerate(methods):  # one colour per method in every panel
        pts = [next((c for c in mine if c["method"] == m and c["eval_resolution"] == r), None)
               for r in res]
        xs = [i + 0.08 * (k - len(methods) / 2) for i, p in enumerate(pts) if p]
        pts = [p for p in pts if p]
        if not pts:
          continue
        ys = np.array([100 * p["mean"] for p in pts])
        lo = np.nan_to_num(ys - 100 * np.array([p["lo"] for p in pts]))
        hi = np.nan_to_num(100 * np.array([p["hi"] for p in pts]) - ys)
        ax_.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, linestyle="none",
                     color=f"C{k}", label=method_names[m])
      ax_.set_xticks(range(len(res)), [f"{r} px" if r != "HR" else "HR" for r in res])
      ax_.set_title(f"{s}: {title}, {int(100 * summary['confidence'])} % intervals")
      ax_.grid(alpha=0.3)
      ax_.legend(fontsize=7)
    axd.axhline(0, color="k", lw=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(out_dir: str, workdirs: Sequence[str], method_names: Dict[str, str],
                 title: str = "Results over runs", notes: Sequence[str] = ()) -> str:
  """results.json / results.md / results.png in out_dir from the runs' results.json."""
  runs = load_runs(workdirs)
  workdirs = [w for w, _ in runs]
  summary = summarize(runs)
  md = "\n".join([f"# {title}", "", *notes, *([""] if notes else []),
                  f"Runs ({len(workdirs)}): " + ", ".join(
                      f"`{os.path.relpath(w, out_dir)}`" for w in workdirs), "",
                  markdown(summary, method_names)])
  from askd_jax.workdir import write_json, write_text
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "results.json"), summary)
  write_text(os.path.join(out_dir, "results.md"), md)
  try:
    plot(summary, os.path.join(out_dir, "results.png"), method_names)
  except Exception as e:  # a missing plotting backend must not lose the results
    print(f"warning: could not draw results.png ({type(e).__name__}: {e})")
  return md
