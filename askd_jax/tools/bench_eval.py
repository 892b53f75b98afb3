"""Evaluation at benchmark scale: wall time, images/s and peak RSS of `--evaluate`.

    python -m askd_jax.tools.bench_eval --layout=tinyface --out=/tmp/bench_tinyface
    python -m askd_jax.tools.bench_eval --layout=ijbc --out=/tmp/bench_ijbc --images=100000
    python -m askd_jax.tools.bench_eval --layout=tinyface --out=/tmp/bench_tf_small \\
        --distractors=20000 --code=/path/to/other/checkout     # another version's evaluation

1. writes a set in its distributed layout, cheaply (a few distinct 112x112 JPEG faces
   hard-linked under every file name): TinyFace (AdaFace's aligned release: Probe/,
   Gallery_Match/, Gallery_Distractor/; the real counts by default: 3,728 probes, 4,443
   gallery matches, 153,428 distractors) or IJB-C (insightface's release: loose_crop/ photos,
   meta/ijbc_face_tid_mid.txt, ijbc_name_5pts_score.txt, ijbc_template_pair_label.txt; about
   20 images in 6 media per template, IJB-C's ratio of pairs to images);
2. prepares it with `python -m askd_jax.data.prepare` (skipped when OUT holds it already);
3. exports a small random model (iResNet-CBAM, one block per stage, --width, --embedding_dim);
4. runs the real CLI, `python -m askd_jax.main --config=configs/facerec.py:tinyface
   --evaluate=MODEL ...` (`--config.data.ijb=ijbc,` for IJB-C), under `--code` (default: this
   checkout), and reports its wall time, images/s and peak RSS (the process's own ru_maxrss,
   from os.wait4), appended as one JSON line to OUT/bench_eval.jsonl.

Not a test: the full sets take tens of minutes on a 2-core CPU (docs/scaling.md holds the
measured table and the commands).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np
from absl import app, flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS
flags.DEFINE_enum("layout", "tinyface", ["tinyface", "ijbc"], "which set to generate")
flags.DEFINE_string("out", None, "working folder (the set, its prepared copy, the model, results)")
flags.DEFINE_integer("probes", 3728, "TinyFace: probe images")
flags.DEFINE_integer("matches", 4443, "TinyFace: gallery images with a mate")
flags.DEFINE_integer("distractors", 153428, "TinyFace: distractor gallery images")
flags.DEFINE_integer("images", 100_000, "IJB-C: crops")
flags.DEFINE_integer("distinct", 16, "distinct JPEGs the files are hard links of")
flags.DEFINE_integer("jpeg_quality", 75, "quality of those JPEGs (TinyFace)")
flags.DEFINE_integer("image_size", 112, "model input: the stored 112 px crops are decoded to it")
flags.DEFINE_float("width", 0.125, "model width multiplier")
flags.DEFINE_integer("embedding_dim", 512, "model embedding size")
flags.DEFINE_integer("batch", 64, "--config.eval.batch_size")
flags.DEFINE_string("eval_sizes", "", "--eval_sizes of the CLI ('' = HR)")
flags.DEFINE_string("code", ROOT, "the checkout whose askd_jax evaluates (cwd and PYTHONPATH)")
flags.DEFINE_string("label", "", "a name for this measurement in the results line")
flags.mark_flag_as_required("out")

IDENTITIES = 2570  # TinyFace's test identities
IJBC = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557,
        "subjects": 3_531}


def _distinct_jpegs(folder: str, n: int) -> List[str]:
  from askd_jax.data import fixtures
  os.makedirs(folder, exist_ok=True)
  out = []
  for k in range(n):
    path = os.path.join(folder, f"face_{k}.jpg")
    if not os.path.exists(path):
      Image.fromarray(fixtures.identity_pixels(k, k, 112)).save(path, quality=FLAGS.jpeg_quality)
    out.append(path)
  return out


def _link(src: str, dst: str) -> None:
  if not os.path.exists(dst):
    os.link(src, dst)


def write_tinyface(root: str) -> str:
  """AdaFace's aligned TinyFace layout under root/tinyface; returns that folder."""
  top = os.path.join(root, "tinyface")
  src = _distinct_jpegs(os.path.join(root, "distinct"), FLAGS.distinct)
  for sub, n, name in (("Probe", FLAGS.probes, "{i}_{k}.jpg"),
                       ("Gallery_Match", FLAGS.matches, "{i}_{k}.jpg"),
                       ("Gallery_Distractor", FLAGS.distractors, "d_{k}.jpg")):
    os.makedirs(os.path.join(top, sub), exist_ok=True)
    for k in range(n):
      _link(src[k % len(src)], os.path.join(top, sub, name.format(i=k % IDENTITIES, k=k)))
  return top


def write_ijbc(root: str) -> str:
  """insightface's IJB-C layout under root/ijb/IJBC at FLAGS.images crops; returns root/ijb."""
  from askd_jax.data import align
  top = os.path.join(root, "ijb")
  # Flat 200x190 photos, the face's 5 points shifted by (k, k): their aligned PNG crops stay
  # small (tfds's writer needs TensorFlow once a split passes 1 GB in memory, see
  # docs/scaling.md), the alignment work is IJB's.
  folder = os.path.join(root, "ijb_distinct")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(1)
  photos, marks, scores = [], [], []
  assert FLAGS.distinct <= 16, "--distinct: at most 16 flat photos"
  for k in range(FLAGS.distinct):
    photos.append(os.path.join(folder, f"{k}.jpg"))
    flat = np.full((190, 200, 3), (40 + 11 * k, 90 + 7 * k, 140 + 5 * k), np.uint8)
    Image.fromarray(flat).save(photos[-1], quality=90)
    marks.append(align.ARCFACE_TEMPLATE + 40 + k)
    scores.append(round(float(rng.uniform(0.3, 1.0)), 6))
  rel = {"landmarks": np.stack(marks), "scores": scores}
  n = FLAGS.images
  scale = n / IJBC["images"]
  n_tmpl = max(2, round(IJBC["templates"] * scale))
  rng = np.random.default_rng(0)
  template = np.sort(rng.integers(0, n_tmpl, n)) + 1        # ~20 images per template
  media = template * 10 + rng.integers(0, 6, n)             # ~6 media per template
  subject = rng.integers(0, max(2, round(IJBC["subjects"] * scale)), n_tmpl + 1)
  crops, meta = os.path.join(top, "IJBC", "loose_crop"), os.path.join(top, "IJBC", "meta")
  os.makedirs(crops, exist_ok=True)
  os.makedirs(meta, exist_ok=True)
  with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
    f.writelines(f"{k}.jpg {template[k]} {media[k]}\n" for k in range(n))
  with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
    for k in range(n):
      j = k % len(photos)
      _link(photos[j], os.path.join(crops, f"{k}.jpg"))
      pts = " ".join(f"{v:.4f}" for v in rel["landmarks"][j].reshape(-1))
      f.write(f"{k}.jpg {pts} {rel['scores'][j]}\n")
  used = np.unique(template)
  n_pairs = max(2, round(IJBC["pairs"] * scale))
  by_subject: Dict[int, List[int]] = {}
  for t in used:
    by_subject.setdefault(int(subject[t]), []).append(int(t))
  genuine = [(a, b) for ts in by_subject.values() for i, a in enumerate(ts) for b in ts[i + 1:]]
  genuine = genuine[:max(1, round(IJBC["genuine"] * scale))]
  t1, t2 = rng.choice(used, n_pairs), rng.choice(used, n_pairs)
  impostor = (subject[t1] != subject[t2]) & (t1 != t2)
  with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
    f.writelines(f"{a} {b} 1\n" for a, b in genuine)
    f.writelines(f"{a} {b} 0\n" for a, b in zip(t1[impostor][:n_pairs - len(genuine)],
                                                 t2[impostor][:n_pairs - len(genuine)]))
  return top


def _prepare(dataset: str, manual: str, data_dir: str) -> Dict[str, Any]:
  done = os.path.join(data_dir, f".{dataset}_prepared")
  if os.path.exists(done):
    return json.load(open(done))
  t = time.time()
  r = subprocess.run([sys.executable, "-m", "askd_jax.data.prepare", f"--dataset={dataset}",
                      f"--manual_dir={manual}", f"--data_dir={data_dir}"], cwd=ROOT,
                     capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f"prepare --dataset={dataset} failed:\n{r.stderr[-3000:]}")
  info = {"prepare_s": time.time() - t}
  with open(done, "w") as f:
    json.dump(info, f)
  return info


def _model(path: str) -> str:
  import jax
  import jax.numpy as jnp
  from askd_jax.models import MarginModel, iresnet_cbam
  from askd_jax.train.checkpoint import export_model
  if os.path.exists(os.path.join(path, "model.json")):
    return path
  spec = {"task": "facerec", "arch": "iresnet_cbam", "depth": None, "width": FLAGS.width,
          "stage_sizes": [1, 1, 1, 1], "embedding_dim": FLAGS.embedding_dim, "num_classes": None,
          "margin": "arcface", "s": 32.0, "m": 0.5, "input_size": FLAGS.image_size,
          "channel_order": "rgb"}
  model = MarginModel(iresnet_cbam(None, FLAGS.width, (1, 1, 1, 1),
                                   embedding_dim=FLAGS.embedding_dim))
  x = jnp.zeros((1, FLAGS.image_size, FLAGS.image_size, 3))
  variables = model.init(jax.random.key(0), x, None, train=False)
  export_model(path, variables, spec)
  return path


def _evaluate(cmd: List[str]) -> Dict[str, Any]:
  """Runs cmd in FLAGS.code; its wall time, peak RSS (ru_maxrss of that process) and stdout."""
  env = dict(os.environ, PYTHONPATH=FLAGS.code, JAX_PLATFORMS="cpu")
  log = os.path.join(os.path.abspath(FLAGS.out), "evaluate")
  t = time.time()
  with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
    p = subprocess.Popen(cmd, cwd=FLAGS.code, env=env, stdout=out, stderr=err)
    _, status, ru = os.wait4(p.pid, 0)  # this process's own peak RSS
  wall = time.time() - t
  code = os.waitstatus_to_exitcode(status)
  if code:
    raise SystemExit(f"the evaluation failed (exit {code}); see {log}.err:\n"
                     + open(log + ".err").read()[-3000:])
  text = open(log + ".out").read()
  return {"wall_s": wall, "max_rss_bytes": ru.ru_maxrss * 1024,
          "results": json.loads(text[text.index("{"):])}


def main(argv):
  del argv
  out = os.path.abspath(FLAGS.out)
  data_dir = os.path.join(out, "tfds")
  os.makedirs(data_dir, exist_ok=True)
  if FLAGS.layout == "tinyface":
    prep = _prepare("tinyface", write_tinyface(out), data_dir)
    n_images = FLAGS.probes + FLAGS.matches + FLAGS.distractors
    extra = ["--config.data.tinyface=true"]
  else:
    prep = _prepare("ijbc", write_ijbc(out), data_dir)
    n_images = FLAGS.images
    extra = ["--config.data.ijb=ijbc,", "--config.data.tinyface=false"]
  model = _model(os.path.join(
      out, f"model_w{FLAGS.width}_d{FLAGS.embedding_dim}_{FLAGS.image_size}px"))
  cmd = [sys.executable, "-m", "askd_jax.main", "--config=configs/facerec.py:tinyface",
         f"--evaluate={model}", f"--eval_sizes={FLAGS.eval_sizes}",
         f"--config.data.data_dir={data_dir}", f"--config.eval.batch_size={FLAGS.batch}",
         f"--config.data.image_size={FLAGS.image_size}",
         "--config.jax_cache_dir=", *extra]
  cache = os.path.join(model, "eval.json")  # the CLI caches its results there
  if os.path.exists(cache):
    os.unlink(cache)
  r = _evaluate(cmd)
  row = {"label": FLAGS.label, "layout": FLAGS.layout, "images": n_images,
         "images_per_s": n_images / r["wall_s"], **prep, **r, "code": FLAGS.code,
         "width": FLAGS.width, "embedding_dim": FLAGS.embedding_dim, "batch": FLAGS.batch,
         "image_size": FLAGS.image_size,
         "eval_sizes": FLAGS.eval_sizes, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
         "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  with open(os.path.join(out, "bench_eval.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  print(f"{FLAGS.layout}: {n_images} images, {r['wall_s']:.0f} s wall, "
        f"{row['images_per_s']:.0f} img/s, peak RSS {r['max_rss_bytes'] / 2**30:.2f} GiB")
  print(json.dumps(r["results"]))


if __name__ == "__main__":
  app.run(main)
