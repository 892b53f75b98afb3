"""Compare two aligned face crops: cosine similarity, and same or different person.

    python -m askd_jax.tools.verify --model=DIR a.jpg b.jpg [--size=14] [--set=lfw]
        [--evaluation=PRESET_OR_KEY] [--threshold=0.3]

The decision uses the threshold the model's own verification evaluation chose
(`verification.deploy_threshold`: the official threshold sweep run once over all pairs of
the set, on the plain cosine of the flip-concat embeddings; stored per set and resolution in
DIR/eval.json by `python -m askd_jax.main --evaluate=DIR` and by every training run; an
export carries it in model.jaxexport.json): the evaluation under the config the model was
trained with, or --evaluation (an evaluation's key or preset, when DIR was also evaluated
under another config); the first set evaluated at this resolution, or --set. The score is
that same plain cosine of concat(emb(x), emb(flip x)) (askd_jax.api); a pair is the same
person when it is above the threshold. The threshold was chosen on the set
it names, so its accuracy there is optimistic. Prints one line; exit code 0.
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
  p.add_argument("--evaluation", default=None, help="the evaluation whose threshold to use: "
                 "its key (or the start of it) or preset in DIR/eval.json (default: the one "
                 "under the model's training config)")
  p.add_argument("--threshold", type=float, default=None, help="use this threshold instead "
                 "of the evaluation's")
  args = p.parse_args(argv)
  from askd_jax import api
  return api.run_cli(PROG, lambda: _verify(args))


def _verify(args) -> int:
  from askd_jax import api
  model = api.load(args.model, batch_size=2, evaluation=args.evaluation)
  size = args.size or None
  if args.threshold is None:
    thr = model.threshold(size, args.set)  # before the (slow) embedding: fail fast
    where = (f"threshold {thr.value:.4f} chosen by the verification on {thr.set_name} at "
             f"{thr.resolution}" + (" px" if thr.resolution != "HR" else "")
             + (f", accuracy {thr.accuracy:.4f}" if thr.accuracy is not None else ""))
    value = thr.value
  else:
    value, where = args.threshold, f"threshold {args.threshold:.4f} given by --threshold"
  a, b = model.embed(list(args.images), size=size)
  sim = model.similarity(a, b)
  verdict = "same person" if sim > value else "different people"
  print(f"{args.images[0]} {args.images[1]}: similarity {sim:.4f}, {verdict} ({where})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
