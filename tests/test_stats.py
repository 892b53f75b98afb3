"""askd_jax.stats: interval coverage on simulated experiments, paired vs unpaired, the report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
from scipy import stats as sps

from askd_jax import stats
from askd_jax.evaluate.verification import fold_scores, tar_at_far

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _simulate(rng, n_runs, diff, run_sd, noise_sd, base=0.9):
  """n_runs runs of two methods: a shared run effect (split, seed, teacher) + each method's
  own noise; the true difference b - a is `diff`."""
  run = rng.normal(0, run_sd, n_runs)
  a = base + run + rng.normal(0, noise_sd, n_runs)
  b = base + diff + run + rng.normal(0, noise_sd, n_runs)
  return a, b


def test_t_interval_matches_the_formula():
  x = [0.91, 0.88, 0.93, 0.90, 0.87]
  iv = stats.t_interval(x)
  half = sps.t.ppf(0.975, 4) * np.std(x, ddof=1) / math.sqrt(5)
  assert iv.n == 5 and math.isclose(iv.mean, np.mean(x))
  assert math.isclose(iv.lo, np.mean(x) - half) and math.isclose(iv.hi, np.mean(x) + half)
  one = stats.t_interval([0.9])
  assert one.n == 1 and math.isnan(one.lo) and not one.significant


def test_mean_interval_coverage():
  """Over 2000 simulated 8-run experiments the 95 % interval holds the true mean ~95 % of
  the time (binomial sd 0.49 %: the bounds are 3 sd)."""
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(2000):
    iv = stats.t_interval(rng.normal(0.9, 0.02, 8))
    hits += iv.lo <= 0.9 <= iv.hi
  assert 0.935 <= hits / 2000 <= 0.965


def test_paired_difference_coverage_with_a_known_difference():
  """Correlated runs (run effect sd 2 points, method noise sd 0.2), true difference +0.4
  points: the paired interval covers +0.4 in ~95 % of 2000 experiments, and mostly
  excludes 0 (the effect is 4 standard errors of the 8-run mean difference)."""
  rng = np.random.default_rng(1)
  hits = signif = 0
  for _ in range(2000):
    a, b = _simulate(rng, 8, 0.004, 0.02, 0.002)
    iv = stats.paired_difference(b, a)
    hits += iv.lo <= 0.004 <= iv.hi
    signif += iv.significant
  assert 0.935 <= hits / 2000 <= 0.965
  assert signif / 2000 > 0.85
  # no true difference: the interval excludes 0 in ~5 % of experiments (false positives)
  false = sum(stats.paired_difference(*_simulate(rng, 8, 0.0, 0.02, 0.002)).significant
              for _ in range(2000))
  assert 0.035 <= false / 2000 <= 0.065


def test_paired_is_much_narrower_than_unpaired_on_correlated_runs():
  """Same data, pairing ignored (Welch): the run effect enters the difference's variance,
  the interval is ~10x wider and the +0.4 point effect is rarely found."""
  rng = np.random.default_rng(2)
  ratios, welch_signif = [], 0
  for _ in range(500):
    a, b = _simulate(rng, 8, 0.004, 0.02, 0.002)
    p, w = stats.paired_difference(b, a), stats.welch_difference(b, a)
    assert math.isclose(p.mean, w.mean)  # the same point estimate
    ratios.append((p.hi - p.lo) / (w.hi - w.lo))
    welch_signif += w.significant
  assert np.median(ratios) < 0.25
  assert welch_signif / 500 < 0.2
  # uncorrelated runs: pairing neither helps nor hurts much
  a, b = _simulate(np.random.default_rng(3), 200, 0.0, 0.0, 0.01)
  p, w = stats.paired_difference(b, a), stats.welch_difference(b, a)
  assert 0.8 < (p.hi - p.lo) / (w.hi - w.lo) < 1.2


def test_paired_p_value_is_scipy_ttest_rel():
  a, b = [0.90, 0.91, 0.88, 0.92], [0.91, 0.93, 0.88, 0.95]
  assert math.isclose(stats.paired_difference(b, a).p, sps.ttest_rel(b, a).pvalue)


def test_holm():
  # sorted p 0.01, 0.02, 0.04 vs 0.05/3, 0.05/2, 0.05/1: the first two rejected, then 0.04
  # would pass alone, but Holm stops at the first failure only: 0.04 <= 0.05 passes too.
  assert stats.holm([0.04, 0.01, 0.02]) == [True, True, True]
  assert stats.holm([0.03, 0.01, 0.2]) == [False, True, False]  # 0.03 > 0.05/2
  assert stats.holm([0.5, 0.02]) == [False, True]


def _write_run(path, values):
  """A results.json like askd_jax.main writes: values {(method, res): (accuracy, tar)}."""
  os.makedirs(path, exist_ok=True)
  rows = [{"method": m, "eval_resolution": r, "set": "orl_test", "accuracy": acc, "std": 0.01,
           "tar_far1e-2": tar, "stage": f"student_{m}_{r}px"}
          for (m, r), (acc, tar) in values.items()]
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"meta": {"elapsed_s": 1.0}, "rows": rows}, f)


def test_report_cli_intervals_and_significance(tmp_path):
  """python -m askd_jax.report --out: the cells are mean [t interval] over the runs, the
  differences paired within a run; askd (+2 points in each of 6 runs, sign-flip p = 2/64) is
  bold, at (+-) is not."""
  base = [0.80, 0.86, 0.90, 0.84, 0.82, 0.88]
  dirs = []
  for i, b in enumerate(base):
    wd = tmp_path / f"run{i}"
    _write_run(wd, {("teacher", "HR"): (0.95, 0.9), ("none", "7"): (b, 0.5),
                    ("askd", "7"): (b + 0.02 + 0.001 * i, 0.5 + 0.01 * i),
                    ("at", "7"): (b + (0.01 if i % 2 else -0.01), 0.5)})
    dirs.append(str(wd))
  out = tmp_path / "agg"
  r = subprocess.run([sys.executable, "-m", "askd_jax.report", "--out", str(out), *dirs],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  md = (out / "results.md").read_text()
  assert r.stdout.strip() in md or "Student, A-SKD" in r.stdout
  summary = json.loads((out / "results.json").read_text())
  cell = next(c for c in summary["cells"] if c["method"] == "none" and c["metric"] == "accuracy")
  half = sps.t.ppf(0.975, 5) * np.std(base, ddof=1) / math.sqrt(6)
  assert math.isclose(cell["lo"], np.mean(base) - half) and cell["n"] == 6
  d = {(x["method"], x["metric"]): x for x in summary["diffs"]}
  askd = d[("askd", "accuracy")]
  assert math.isclose(askd["mean"], 0.0225) and askd["significant"]
  # Holm over the table's 2 differences asks p <= 0.025, below what 6 runs can give
  assert math.isclose(askd["p_signflip"], 2 / 64) and not askd["holm"]
  assert not d[("at", "accuracy")]["significant"]
  assert ("teacher", "accuracy") not in d
  # the unpaired spread of the runs (6 points) would hide askd's +2: pairing finds it
  assert stats.welch_difference([b + 0.02 for b in base], base).significant is False
  assert "| Student, A-SKD | **+2.25 [" in md and "sign-flip p=0.031 |" in md
  assert "| Student, AT | +0.00 [" in md
  assert "TAR at FAR 1e-2" in md
  ratio = (askd["hi"] - askd["lo"]) / (askd["unpaired"]["hi"] - askd["unpaired"]["lo"])
  assert ratio < 0.1  # the runs' 6-point spread cancels in the pairs
  assert "Median width of these paired intervals: " in md
  assert (out / "results.png").stat().st_size > 0
  # a run that has not finished is named, not silently dropped
  r = subprocess.run([sys.executable, "-m", "askd_jax.report", *dirs, str(tmp_path / "nope")],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "nope/results.json does not exist" in r.stderr


def test_tar_at_far_is_the_best_tar_with_far_at_most_the_target():
  """Brute force over every threshold: the highest TAR whose FAR (score > t) is <= 1e-2."""
  rng = np.random.default_rng(0)
  n = 900
  same = np.arange(n) < 450
  e1 = rng.normal(size=(n, 16))
  e2 = np.where(same[:, None], e1 + rng.normal(0, 1.2, (n, 16)), rng.normal(size=(n, 16)))
  got = tar_at_far(e1, e2, same, 1e-2)
  s = fold_scores(e1.astype(np.float64), e2.astype(np.float64), np.ones(n, bool))
  best = 0.0
  for t in np.concatenate([s, [np.inf]]):
    if np.mean(s[~same] > t) <= 1e-2:
      best = max(best, np.mean(s[same] > t))
  assert 0.05 < got < 0.99  # a case where the threshold matters
  assert math.isclose(got, best, rel_tol=1e-6)


def test_single_run_report_has_the_tar_table():
  from askd_jax import report
  rows = [{"method": "teacher", "eval_resolution": "HR", "set": "orl_test", "accuracy": 0.9,
           "std": 0.02, "tar_far1e-2": 0.61},
          {"method": "none", "eval_resolution": "7", "set": "orl_test", "accuracy": 0.8,
           "std": 0.03, "tar_far1e-2": 0.4234}]
  md = report.markdown_table(rows, {"preset": "compare"})
  tar = md[md.index("TAR (%) at FAR 1e-2 on `orl_test`"):]
  assert "| Teacher (HR-trained) | 61.00 |  |" in tar
  assert "| Student, no distillation |  | 42.34 |" in tar
  assert "TAR" not in report.markdown_table([{k: v for k, v in r.items() if k != "tar_far1e-2"}
                                             for r in rows], {})


def _summary(diffs_per_run, base=(0.80, 0.86, 0.90, 0.84, 0.82, 0.88, 0.85, 0.83)):
  """summarize() over runs whose askd - none accuracy differences are `diffs_per_run`."""
  runs = []
  for i, d in enumerate(diffs_per_run):
    rows = [{"method": m, "eval_resolution": "7", "set": "orl_test", "accuracy": acc}
            for m, acc in (("none", base[i]), ("askd", base[i] + d))]
    runs.append((f"run{i}", rows))
  s = stats.summarize(runs)
  return s, next(d for d in s["diffs"] if d["method"] == "askd")


def test_runs_that_agree_exactly_are_not_evidence():
  """Every run gives the same difference (accuracies on a 1/900 grid make this common at
  2-4 runs): the t interval has zero width, which is no evidence. The exact paired sign-flip
  test gives p = 2 / 2^n (0.25 with 3 runs), so the cell is not significant, Holm neither,
  and the table prints no zero-width interval. Before the fix (p = 0 and "significant"
  whenever the runs agreed) this test failed on every assertion about p and significance."""
  s, d = _summary([1 / 900] * 3)
  assert d["lo"] == d["hi"]  # the t interval has nothing to scale
  assert math.isclose(d["p_signflip"], 0.25) and not d["significant"] and not d["holm"]
  md = stats.markdown(s, {"none": "Student, no distillation", "askd": "Student, A-SKD"})
  row = next(l for l in md.splitlines() if l.startswith("| Student, A-SKD | +"))
  assert "[" not in row and "**" not in row and "\u2020" not in row, row
  assert "all 3 runs equal" in row and "sign-flip p=0.250" in row
  # no difference at all: p = 1
  _, d = _summary([0.0] * 4)
  assert d["p_signflip"] == 1.0 and not d["significant"]
  # 6 runs that agree exactly: p = 2 / 64 < 0.05, the smallest n that can reach 5 %
  _, d = _summary([1 / 900] * 6)
  assert math.isclose(d["p_signflip"], 2 / 64) and d["significant"]
  _, d = _summary([1 / 900] * 5)
  assert math.isclose(d["p_signflip"], 2 / 32) and not d["significant"]


def test_sign_flip_p_is_the_exact_enumeration():
  """p = share of the 2^n sign patterns whose |mean| reaches the observed one (brute force);
  the t interval excluding 0 alone no longer makes a cell significant with 4 runs."""
  import itertools
  rng = np.random.default_rng(4)
  for n in (3, 4, 7):
    d = rng.normal(0.01, 0.01, n)
    obs = abs(d.mean())
    flips = [abs((np.array(s) * d).mean()) >= obs - 1e-12
             for s in itertools.product((1, -1), repeat=n)]
    got = stats.paired_difference(d, np.zeros(n))
    assert math.isclose(got.p_signflip, np.mean(flips)), (n, got.p_signflip, np.mean(flips))
  # 4 runs whose t interval excludes 0: the sign-flip p cannot go below 2/16 = 0.125
  s, d = _summary([0.010, 0.011, 0.012, 0.0105])
  assert d["lo"] > 0 and math.isclose(d["p_signflip"], 0.125) and not d["significant"]
