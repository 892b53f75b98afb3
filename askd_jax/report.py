"""results.json, results.md (methods x resolutions, as the paper's tables) and a plot."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from askd_jax.stats import res_key as _res_key

METHOD_NAMES = {"teacher": "Teacher (HR-trained)", "none": "Student, no distillation",
                "askd": "Student, A-SKD", "at": "Student, AT", "fkd": "Student, F-KD",
                "horkd": "Student, HORKD"}


def write_report(workdir: str, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
  """rows: {method, eval_resolution, set, accuracy, std, stage}. Returns the markdown table."""
  from askd_jax.workdir import write_json, write_text
  write_json(os.path.join(workdir, "results.json"), {"meta": meta, "rows": rows})
  md = markdown_table(rows, meta)
  write_text(os.path.join(workdir, "results.md"), md)
  try:
    plot(rows, os.path.join(workdir, "results.png"), meta.get("ylabel"))
  except Exception as e:  # a missing plotting backend must not lose the results
    print(f"warning: could not draw results.png ({type(e).__name__}: {e})")
  return md


def markdown_table(rows, meta) -> str:
  sets = sorted({r["set"] for r in rows})
  res = sorted({r["eval_resolution"] for r in rows}, key=_res_key)
  methods = [m for m in METHOD_NAMES if any(r["method"] == m for r in rows)]
  out = [f"# Results: {meta.get('preset', '')}", ""]
  if meta.get("description"):
    out += [meta["description"], ""]
  for s in sets:
    cap = meta.get("caption") or "Verification accuracy (%) on `{set}`, 10-fold mean +- std"
    if "_TAR@FAR=" in s:  # an IJB set (askd_jax.evaluate.ijb)
      name, far = s.split("_TAR@FAR=")
      cap = f"{name.upper()} 1:1 template verification, TAR (%) at FAR {far}"
    out += [cap.format(set=s) + "; columns: the resolution the model sees at test time.", ""]
    head = ["| method | " + " | ".join(f"{c} px" if c != "HR" else "HR" for c in res) + " |",
            "|---|" + "---|" * len(res)]
    out += head
    for m in methods:
      cells = []
      for c in res:
        hit = [r for r in rows if r["method"] == m and r["eval_resolution"] == c and r["set"] == s]
        if hit and hit[0].get("std") is not None:
          cells.append(f"{100 * hit[0]['accuracy']:.2f} +- {100 * hit[0]['std']:.2f}")
        else:
          cells.append(f"{100 * hit[0]['accuracy']:.2f}" if hit else "")
      out.append(f"| {METHOD_NAMES[m]} | " + " | ".join(cells) + " |")
    out.append("")
    tar = {(r["method"], r["eval_resolution"]): r["tar_far1e-2"] for r in rows
           if r["set"] == s and r.get("tar_far1e-2") is not None}
    if tar:  # face verification: the second metric (askd_jax.evaluate.verification.tar_at_far)
      out += [f"TAR (%) at FAR 1e-2 on `{s}`, all pairs at once", "", *head]
      out += [f"| {METHOD_NAMES[m]} | " + " | ".join(
          f"{100 * tar[(m, c)]:.2f}" if (m, c) in tar else "" for c in res) + " |"
          for m in methods]
      out.append("")
  if meta.get("elapsed_s") is not None:
    out.append(f"Total wall time: {meta['elapsed_s'] / 60:.1f} min on {meta.get('machine', '?')}.")
  return "\n".join(out) + "\n"


def plot(rows, path: str, ylabel: str | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sets = sorted({r["set"] for r in rows})
  fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
  for ax, s in zip(axes[0], sets):
    for m in METHOD_NAMES:
      pts = sorted([r for r in rows if r["method"] == m and r["set"] == s],
                   key=lambda r: _res_key(r["eval_resolution"]), reverse=True)
      if not pts:
        continue
      xs = [str(p["eval_resolution"]) for p in pts]
      ax.errorbar(xs, [100 * p["accuracy"] for p in pts], yerr=[100 * (p.get("std") or 0) for p in pts],
                  marker="o", capsize=3, label=METHOD_NAMES[m])
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel(ylabel or "accuracy (%)")
    ax.set_title(s)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def aggregate_runs(workdirs: List[str], out_dir: str | None = None) -> str:
  """Several runs (seeds, splits) of one config: mean [95 % t interval] over runs of each
  (method, resolution, set, metric) and each method's paired difference to `none` within
  a run (askd_jax/stats.py). out_dir: also write results.md/.json/.png there."""
  from askd_jax import stats
  if out_dir:
    return stats.write_report(out_dir, workdirs, METHOD_NAMES)
  return stats.markdown(stats.summarize(stats.load_runs(workdirs)), METHOD_NAMES)


USAGE = ("usage: python -m askd_jax.report [--out DIR] WORKDIR [WORKDIR ...]  (mean [95 % CI] "
         "over runs, paired differences to `none`)")


def main(argv) -> int:
  """The CLI: one `error: ` line on stderr, exit 1 for an unreadable run, 2 for usage."""
  import sys
  from askd_jax import stats
  from askd_jax.tools.paths import OutputPathError, check_output
  args = list(argv)
  out = None
  if args[:1] == ["--out"] and len(args) > 1:
    out, args = args[1], args[2:]
  if not args or any(a.startswith("-") for a in args):
    print(USAGE, file=sys.stderr)
    return 2
  try:
    if out:
      check_output("--out", out, directory=True)
    print(aggregate_runs(args, out))
  except stats.SameRunError as e:  # the arguments name one run twice: usage
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OutputPathError as e:  # as the other tools: an unwritable place is a run-time failure
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (OSError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main(sys.argv[1:]))
