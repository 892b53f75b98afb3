"""Draw where the teacher and its students look, as PNG files and a JSON of similarities.

    python -m askd_jax.tools.attention --workdir=workdir/facerec_demo --out=attention
        [--images=FOLDER_OF_ALIGNED_FACES] [--num_images=4] [--size=7] [--raw_scale]

Writes into --out:
  attention_<i>.png   per image: rows = the image, the teacher (HR input), each student (its
                      own LR input); columns = the input, then the spatial attention of each
                      CBAM block (sigmoid, upsampled, over the image)
  similarity.png      per-block cosine of each student's channel and spatial attention to
                      the teacher's, averaged over the run's verification images
  similarity.json     those numbers, and for each size on how many blocks A-SKD beats
                      the no-distillation student
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m askd_jax.tools.attention", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a run of askd_jax.main (teacher/, student_*/)")
  p.add_argument("--out", required=True, help="folder for the PNG and JSON files")
  p.add_argument("--images", default=None, help="folder of aligned face images (default: the "
                 "run's test images); they are resized to the model input")
  p.add_argument("--num_images", type=int, default=4, help="how many images get a grid")
  p.add_argument("--size", type=int, default=0, help="only the students of this LR size in the "
                 "grids (0: all)")
  p.add_argument("--max_eval_images", type=int, default=0, help="average the similarities over "
                 "at most this many test images (0: all)")
  p.add_argument("--raw_scale", action="store_true", help="draw heat maps on the fixed [0, 1] "
                 "sigmoid scale instead of stretching each to its own 2..98th percentile")
  p.add_argument("--data_dir", default=None, help="tfds data_dir, if not the run's")
  p.add_argument("--dpi", type=int, default=80)
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
  import logging
  import matplotlib
  matplotlib.use("Agg")
  for name in ("absl", "matplotlib", "orbax"):  # checkpoint-restore chatter, not the user's problem
    logging.getLogger(name).setLevel(logging.ERROR)
  import matplotlib.pyplot as plt
  from askd_jax.evaluate import attention as att

  if args.num_images < 1:
    raise ValueError(f"--num_images={args.num_images}: must be at least 1")
  r = att.load_run(args.workdir, args.data_dir)
  if args.size and args.size not in r.sizes:
    raise ValueError(f"--size={args.size}: the run has students at {r.sizes} px; pick one of them "
                     "or 0 for all")
  os.makedirs(args.out, exist_ok=True)
  set_name, test = att.eval_images(r, args.max_eval_images or None)
  if args.images:
    images = att.load_image_folder(args.images, r.task.input_size, args.num_images)
  else:
    images = att.pick(test, args.num_images)

  stages = r.grid_stages(args.size or None)
  maps = [att.attention_maps(r, st, images) for st in stages]
  written: List[str] = []
  for i in range(len(images)):
    fig = att.attention_grid(stages, maps, i, normalize=not args.raw_scale)
    path = os.path.join(args.out, f"attention_{i}.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    written.append(path)

  sims = att.similarities(r, test)
  sims.update(workdir=r.workdir, image_set=set_name, num_images=int(len(test)),
              measure="per-image cosine of flattened pre-sigmoid maps, mean over images",
              askd_vs_none=att.compare(sims))
  fig = att.similarity_plot(sims, f"cosine to the teacher, mean over {len(test)} {set_name} images")
  path = os.path.join(args.out, "similarity.png")
  fig.savefig(path, dpi=args.dpi + 20)
  plt.close(fig)
  written.append(path)
  path = os.path.join(args.out, "similarity.json")
  with open(path, "w") as f:
    json.dump(sims, f, indent=2)
  written.append(path)
  print(summary(sims))
  print("wrote " + ", ".join(written))
  return sims


def summary(sims: dict) -> str:
  """A markdown table: one row per student and map kind, one column per block."""
  k = sims["num_blocks"]
  lines = ["| student | map | " + " | ".join(f"b{j + 1}" for j in range(k)) + " | mean |",
           "|---|---|" + "---|" * (k + 1)]
  for v in sims["students"].values():
    for kind in ("channel", "spatial"):
      vals = v[kind]
      lines.append(f"| {v['label']} | {kind} | " + " | ".join(f"{x:.3f}" for x in vals)
                   + f" | {sum(vals) / len(vals):.3f} |")
  for size, row in sims.get("askd_vs_none", {}).items():
    for kind, c in row.items():
      lines.append(f"\n{size}px {kind}: A-SKD closer to the teacher on {c['higher_blocks']} of "
                   f"{c['num_blocks']} blocks")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, compilation_cache: bool = False) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  try:
    if compilation_cache:
      from askd_jax.evaluate.attention import enable_compilation_cache, load_config
      enable_compilation_cache(load_config(args.workdir))
    run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(compilation_cache=True))
