"""Compare two aligned face crops: cosine similarity, and same or different person.

    python -m askd_jax.tools.verify --model=DIR a.jpg b.jpg [--size=14] [--set=lfw]
        [--threshold=0.3]

The decision uses the threshold the model's own verification evaluation chose (the mean of
its 10 folds' thresholds, stored per set and resolution in DIR/eval.json by `python -m
askd_jax.main --evaluate=DIR`; an export carries it in model.jaxexport.json): the first set
evaluated at this resolution, or --set. A pair is the same person when its score is above
the threshold, as in the evaluation. The score is the cosine of the embeddings
(concat(emb(x), emb(flip x)), see askd_jax.api) after subtracting the evaluation's mean
embedding ("center" beside the threshold) as the official protocol centres its pairs; when
the evaluation stored no center the plain cosine is used and the line says "uncentred"
(the threshold is then only approximate). Prints one line; exit code 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from askd_jax.tools.embed import add_model_flags

PROG = "python -m askd_jax.tools.verify"


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  add_model_flags(p)
  p.add_argument("images", nargs=2, metavar="IMAGE", help="two aligned face crops")
  p.add_argument("--set", default=None, help="the verification set whose threshold to use "
                 "(default: the first one evaluated)")
  p.add_argument("--threshold", type=float, default=None, help="use this threshold instead "
                 "of the evaluation's")
  args = p.parse_args(argv)
  from askd_jax import api
  return api.run_cli(PROG, lambda: _verify(args))


def _verify(args) -> int:
  from askd_jax import api
  model = api.load(args.model, batch_size=2)
  size = args.size or None
  if args.threshold is None:
    thr = model.threshold(size, args.set)  # before the (slow) embedding: fail fast
    where = (f"threshold {thr.value:.4f} chosen by the verification on {thr.set_name} at "
             f"{thr.resolution}" + (" px" if thr.resolution != "HR" else "")
             + (f", accuracy {thr.accuracy:.4f}" if thr.accuracy is not None else ""))
    value, score = thr.value, thr.score
    what = "centred similarity" if thr.center is not None else "similarity (uncentred)"
  else:
    value, where = args.threshold, f"threshold {args.threshold:.4f} given by --threshold"
    score, what = model.similarity, "similarity"
  a, b = model.embed(list(args.images), size=size)
  sim = score(a, b)
  verdict = "same person" if sim > value else "different people"
  print(f"{args.images[0]} {args.images[1]}: {what} {sim:.4f}, {verdict} ({where})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
