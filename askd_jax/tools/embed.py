"""Embed a folder (or a list) of aligned face crops into one .npz file.

    python -m askd_jax.tools.embed --model=DIR --images=FOLDER|LIST --out=embeddings.npz
        [--size=14] [--batch_size=64] [--overwrite]
    python -m askd_jax.tools.embed --model=DIR --images=PHOTOS --landmarks=FILE --out=...

--model: a stage directory of a run, a directory written by tools.convert, or a .jaxexport or
.onnx file written by tools.export.
--images: a folder (searched recursively) or a text file with one image path per line.
--landmarks: raw photos instead of aligned crops: a file of `NAME x1 y1 ... x5 y5 [SCORE]`
lines (NAME relative to the --images folder; askd_jax/data/align.py), each photo aligned to
the ArcFace template at the model's input size before it is embedded (as tools.align).
A landmark line that does not parse stops the run before anything is embedded.
The .npz holds `embeddings` (N, 2D) float32 (concat(emb(x), emb(flip x)), see askd_jax.api),
`paths` (N,) beside them, `skipped` (paths of the images left out) and `skipped_reason`,
`model` (the model's path), `params_hash` (its parameters' hash), `size` (0: high
resolution) and `input_size`.
An image that does not decode or is not a face crop of the model's input size is skipped
with one line on stderr naming it; the others are embedded and written, and the exit code is
1 when anything was skipped (0 when every image was embedded).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

PROG = "python -m askd_jax.tools.embed"


def add_model_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="stage directory, converted checkpoint "
                 "directory, .jaxexport or .onnx file")
  p.add_argument("--size", type=int, default=0, help="degrade the images as for a student "
                 "evaluated at this LR size (0: use them as they are)")
  p.add_argument("--batch_size", type=int, default=64)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  add_model_flags(p)
  p.add_argument("--images", required=True, help="folder of aligned face crops, or a text "
                 "file with one image path per line")
  p.add_argument("--out", required=True, help="the .npz to write")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--landmarks", default=None, help="photos + their 5 points: `NAME x1 y1 "
                 "... x5 y5 [SCORE]` per line, NAME relative to --images (a folder)")
  args = p.parse_args(argv)
  from askd_jax import api
  return api.run_cli(PROG, lambda: _embed(args))


def _embed(args) -> int:
  import numpy as np
  from tqdm import tqdm
  from askd_jax import api
  from askd_jax.tools.paths import check_output, make_parent
  out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # numpy appends it
  check_output("--out", out, overwrite=args.overwrite)  # before any work
  if args.landmarks:
    files, read = _landmark_reader(args.images, args.landmarks)
  else:
    files, read = api.list_images(args.images), api.read_image
  model = api.load(args.model, batch_size=args.batch_size)
  paths, skipped, reasons, faces = [], [], [], []
  for f in files:
    try:
      faces.append(read(f, model.input_size))
      paths.append(f)
    except api.ModelError as e:
      print(f"skipped {e}", file=sys.stderr)
      skipped.append(f)
      reasons.append(str(e))
  if not faces:
    raise api.ModelError(f"--images={args.images}: none of its {len(files)} images could be "
                         "embedded (each is listed above)")
  with tqdm(total=len(faces), desc="embed", unit="img", file=sys.stderr) as bar:
    emb = model.embed(np.stack(faces), size=args.size or None, progress=bar.update)
  tmp = out[:-len(".npz")] + ".tmp.npz"
  make_parent(out)
  np.savez(tmp, embeddings=emb, paths=np.array(paths, dtype=str),
           skipped=np.array(skipped, dtype=str), skipped_reason=np.array(reasons, dtype=str),
           model=np.array(model.path), params_hash=np.array(model.spec.get("params_hash", "")),
           size=np.array(args.size or 0),
           input_size=np.array(model.input_size))
  os.replace(tmp, out)
  print(f"wrote {out}: {len(paths)} embeddings of {emb.shape[1]} floats"
        + (f"; skipped {len(skipped)} image(s), listed above and in its 'skipped'"
           if skipped else ""))
  return 1 if skipped else 0


def _landmark_reader(images: str, landmarks: str):
  """(photo paths, read(path, input_size) -> aligned crop) for --landmarks."""
  from askd_jax import api
  from askd_jax.data import align
  if not os.path.isdir(images):
    raise api.ModelError(f"--images={images}: with --landmarks, give the folder the "
                         "landmark file's names are relative to")
  try:
    entries = align.read_landmarks(landmarks)
  except (ValueError, OSError) as e:
    raise api.ModelError(str(e)) from None
  by_path = {os.path.join(images, e.name): e for e in entries}

  def read(path, input_size):
    e = by_path[path]
    try:
      return align.model_crop(align.read_photo(path), e.points, input_size)
    except (ValueError, OSError) as err:
      raise api.ImageError(f"{landmarks} line {e.line}: {err}") from None
  return list(by_path), read


if __name__ == "__main__":
  sys.exit(main())
