"""Find the gallery faces most similar to a probe face.

    python -m askd_jax.tools.search --model=DIR --gallery=embeddings.npz --probe=img.jpg [--k=5]

The gallery is an .npz written by `python -m askd_jax.tools.embed` with the same model (and
the same --size, which is taken from the gallery). Prints the k nearest gallery images by
cosine similarity, one per line: rank, similarity, path.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

PROG = "python -m askd_jax.tools.search"


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="the model that embedded the gallery")
  p.add_argument("--gallery", required=True, help=".npz written by askd_jax.tools.embed")
  p.add_argument("--probe", required=True, help="an aligned face crop")
  p.add_argument("--k", type=int, default=5, help="how many matches to print")
  args = p.parse_args(argv)
  from askd_jax import api
  return api.run_cli(PROG, lambda: _search(args))


def load_gallery(path: str):
  """(embeddings (N, D), paths (N,), size, model path, params hash) of an embed .npz."""
  import numpy as np
  from askd_jax.api import ModelError
  if not os.path.isfile(path):
    raise ModelError(f"--gallery={path}: no such file; write one with `python -m "
                     "askd_jax.tools.embed --model=DIR --images=FOLDER --out=embeddings.npz`")
  try:
    with np.load(path, allow_pickle=False) as z:
      return (np.asarray(z["embeddings"], np.float32), [str(s) for s in z["paths"]],
              int(z["size"]), str(z["model"]), str(z["params_hash"]))
  except (OSError, ValueError, KeyError) as e:
    raise ModelError(f"--gallery={path}: not an .npz written by askd_jax.tools.embed "
                     f"({type(e).__name__}: {str(e)[:100]})") from None


def _search(args) -> int:
  import numpy as np
  from askd_jax import api
  if args.k < 1:
    raise api.ModelError(f"--k={args.k}: ask for at least one match")
  emb, paths, size, source, phash = load_gallery(args.gallery)
  model = api.load(args.model, batch_size=1)
  mine = model.spec.get("params_hash")
  if phash and mine and phash != mine:
    raise api.ModelError(f"--gallery={args.gallery} was embedded by another model ({source}); "
                         "embed the gallery again with --model, or search with that model")
  probe = model.embed(args.probe, size=size or None)
  if probe.shape[-1] != emb.shape[-1]:
    raise api.ModelError(f"--gallery={args.gallery}: embeddings of {emb.shape[-1]} floats, but "
                         f"--model gives {probe.shape[-1]}; it was embedded by {source}, "
                         "embed the gallery again with this model")
  sims = model.similarity(emb, probe)
  order = np.argsort(-sims, kind="stable")[:args.k]
  print(f"{args.probe}: {len(order)} nearest of {len(paths)} gallery faces"
        + (f" (degraded to {size} px as the gallery)" if size else ""))
  for rank, i in enumerate(order, 1):
    print(f"{rank:3d}  {sims[i]:.4f}  {paths[i]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
