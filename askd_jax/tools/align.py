"""Align face photos with their 5 landmarks to 112x112 ArcFace crops (PNG).

    python -m askd_jax.tools.align --images=DIR --landmarks=FILE --out=DIR [--size=112]
        [--overwrite]

--landmarks: one face per line, `NAME x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [SCORE]` (NAME relative
to --images; points: left eye, right eye, nose, left and right mouth corner, in pixels; the
format of insightface's ijbc_name_5pts_score.txt; see askd_jax/data/align.py).
--out: a new folder; OUT/NAME with the extension replaced by .png (lossless) for each line,
sub-folders kept. The crops are what `python -m askd_jax.tools.embed` and the verification
sets expect.

All lines and images are checked before anything is written, and the crops go to a temporary
folder renamed to --out at the end: a bad line, a missing or undecodable image stops with one
line on stderr naming the file (and line) and exit code 1, leaving no --out behind.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

PROG = "python -m askd_jax.tools.align"


def crop_name(name: str) -> str:
  """The crop's path under --out for a landmark file's NAME (extension -> .png)."""
  return os.path.splitext(name)[0] + ".png"


def align_folder(images: str, landmarks: str, out: str, size: int = 112,
                 overwrite: bool = False) -> int:
  """Writes the crops; returns how many. Raises ValueError/OSError with one-line messages."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from askd_jax.data import align  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(images):
    raise FileNotFoundError(f"--images={images}: no such folder")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out={out} exists; choose another folder or pass --overwrite")
  align.template(size)  # checks the size before reading anything
  entries = align.read_landmarks(landmarks)
  for e in entries:  # every image exists before anything is written
    if not os.path.isfile(os.path.join(images, e.name)):
      raise FileNotFoundError(f"{landmarks} line {e.line}: image {os.path.join(images, e.name)} "
                              "not found")
  tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    for e in entries:
      try:
        crop = align.align_face(align.read_photo(os.path.join(images, e.name)), e.points, size)
      except ValueError as err:
        raise ValueError(f"{landmarks} line {e.line}: {err}") from None
      dest = os.path.join(tmp, crop_name(e.name))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      Image.fromarray(crop).save(dest, format="PNG")
    if os.path.exists(out):  # --overwrite: the old folder goes only once the new one is whole
      old = f"{out.rstrip(os.sep)}.old-{os.getpid()}"
      os.replace(out, old)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return len(entries)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--images", required=True, help="folder the landmark file's names refer to")
  p.add_argument("--landmarks", required=True, help="NAME x1 y1 ... x5 y5 [SCORE] per line")
  p.add_argument("--out", required=True, help="new folder for the aligned PNG crops")
  p.add_argument("--size", type=int, default=112, help="crop size (a multiple of 112)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = p.parse_args(argv)
  if args.size <= 0 or args.size % 112:
    p.error(f"--size={args.size}: use a multiple of 112 (the ArcFace template's size)")
  try:
    n = align_folder(args.images, args.landmarks, args.out, args.size, args.overwrite)
  except (ValueError, OSError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 1
  print(f"wrote {n} aligned {args.size}x{args.size} crops to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
