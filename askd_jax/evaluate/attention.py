"""Where the networks look: CBAM attention of a teacher and its students, side by side.

The teacher sees the high-resolution image; each student sees the image degraded exactly as
it was during training (its own sizes, the run's resize mode and blur). Per CBAM block:

  * spatial attention: sigmoid of the pre-sigmoid (B, h, w) map, bilinearly upsampled to
    the input size, to overlay on the image;
  * similarity to the teacher: per image, the cosine between the flattened PRE-sigmoid maps
    of student and teacher (the quantity the A-SKD loss pulls towards 1), averaged over the
    images; for the channel (B, C) and the spatial (B, h, w) maps.

Used by `python -m askd_jax.tools.attention` and notebooks/attention_maps.ipynb; the ROC
helpers at the end serve notebooks/results.ipynb.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax.evaluate import verification

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
# Spec keys that must agree for two stages to share one compiled model.
_ARCH_KEYS = ("arch", "depth", "width", "stage_sizes", "embedding_dim", "input_size")


@dataclasses.dataclass
class Stage:
  """One trained model of a run."""
  name: str                 # stage directory name: teacher, student_askd_7px, ...
  method: str               # 'teacher' or the distillation method
  sizes: Tuple[int, ...]    # LR sizes the model sees (() = high resolution)
  spec: Dict[str, Any]
  variables: Dict[str, Any]

  @property
  def label(self) -> str:
    if self.method == "teacher":
      return "teacher (HR)"
    return f"{METHOD_LABELS.get(self.method, self.method)} {'/'.join(map(str, self.sizes))}px"


METHOD_LABELS = {"none": "no distillation", "askd": "A-SKD", "at": "AT", "fkd": "F-KD",
                 "horkd": "HORKD"}


@dataclasses.dataclass
class Run:
  """A workdir loaded for inspection: its config, task, one model and the stages."""
  workdir: str
  cfg: Any
  task: Any
  model: Any
  teacher: Stage
  students: List[Stage]
  _fns: Dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

  def student(self, method: str, size: Optional[int] = None) -> Optional[Stage]:
    """The student of this method (and first size == size), or None."""
    for s in self.students:
      if s.method == method and (size is None or s.sizes[0] == size):
        return s
    return None

  @property
  def sizes(self) -> List[int]:
    return sorted({s.sizes[0] for s in self.students})

  def grid_stages(self, size: Optional[int] = None) -> List[Stage]:
    """The teacher, then the students (of this first LR size, or all), none and askd first."""
    return [self.teacher] + [s for s in self.students if size is None or s.sizes[0] == size]

  def degrade_cfg(self, sizes: Sequence[int]) -> Dict[str, Any]:
    from askd_jax.train.loop import student_degrade_cfg
    return student_degrade_cfg(self.cfg.student, tuple(sizes))


# --- loading ---------------------------------------------------------------------------

def load_config(workdir: str):
  """The ConfigDict a workdir was trained with (WORKDIR/config.json, written by main)."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not an askd_jax workdir; "
                            "train one with `python -m askd_jax.main --config=configs/facerec.py`")
  with open(path) as f:
    try:
      cfg = json.load(f)["config"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{path}: not a config written by askd_jax.main ({e})") from e
  return ml_collections.ConfigDict(cfg)


def load_run(workdir: str, data_dir: Optional[str] = None) -> Run:
  """Load the teacher and every finished student of a face-recognition workdir.

  data_dir overrides the config's tfds data_dir (e.g. when the run was made elsewhere).
  """
  from askd_jax.tasks import get_task
  from askd_jax.train.checkpoint import load_model
  workdir = os.path.abspath(os.path.expanduser(workdir))
  cfg = load_config(workdir)
  if cfg.get("task", "facerec") != "facerec":
    raise ValueError(f"{workdir}: task {cfg.task!r}; attention maps are drawn for facerec runs")
  if data_dir is not None:
    cfg.data.data_dir = data_dir
  task = get_task(cfg)
  tdir = os.path.join(workdir, "teacher")
  if not os.path.isdir(tdir) and cfg.student.get("teacher"):
    tdir = cfg.student.teacher
  tvars, tspec = load_model(tdir)
  teacher = Stage("teacher", "teacher", (), tspec, tvars)
  students = []
  for name in sorted(os.listdir(workdir)):
    d = os.path.join(workdir, name)
    if not (name.startswith("student_") and os.path.exists(os.path.join(d, "DONE"))):
      continue
    variables, spec = load_model(d)
    for k in _ARCH_KEYS:
      if spec.get(k) != tspec.get(k):
        raise ValueError(f"{d}: {k}={spec.get(k)!r} but the teacher has {tspec.get(k)!r}; "
                         "attention maps are compared block by block, so the student needs "
                         "the teacher's architecture")
    students.append(Stage(name, spec.get("method", "none"), tuple(spec.get("sizes", ())),
                          spec, variables))
  if not students:
    raise FileNotFoundError(f"{workdir}: no finished student_* stage (a DONE file marks one); "
                            "finish the run first")
  order = {m: i for i, m in enumerate(("none", "askd", "at", "fkd", "horkd"))}
  students.sort(key=lambda s: (s.sizes, order.get(s.method, 99), s.method))
  model = task.model(dtype=jnp.float32, spec=tspec)  # float32: maps compared across models
  return Run(workdir, cfg, task, model, teacher, students)


def enable_compilation_cache(cfg) -> None:
  """Point JAX's persistent compilation cache at the run's (it compiled the same networks).

  Global JAX state: for entry points (the CLI, a notebook), not for library code.
  """
  path = cfg.get("jax_cache_dir")
  if path:
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)


def eval_images(run: Run, max_images: Optional[int] = None) -> Tuple[str, np.ndarray]:
  """(name, (N, S, S, 3) uint8): the first verification set's images (the demo's test set)."""
  vs = run.task.data["verification"][0]
  images = vs["images"][:max_images] if max_images else vs["images"][:]  # decoded (streamed sets)
  return vs["name"], np.asarray(images)


def pick(images: np.ndarray, num: int) -> np.ndarray:
  """`num` images spread evenly over the set (different people on the ordered demo set)."""
  if num < 1:
    raise ValueError(f"num_images={num}: ask for at least one image")
  idx = np.unique(np.linspace(0, len(images) - 1, min(num, len(images))).round().astype(int))
  return images[idx]


def load_image_folder(folder: str, size: int, limit: Optional[int] = None) -> np.ndarray:
  """Aligned face images from a folder, as (N, size, size, 3) uint8 RGB (resized, not cropped)."""
  from PIL import Image
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images={folder}: no such folder; give a folder of aligned face "
                            "images (png/jpg)")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
  if not files:
    raise FileNotFoundError(f"--images={folder}: holds no image file ({', '.join(IMAGE_EXTS)})")
  out = []
  for f in files[:limit]:
    with Image.open(os.path.join(folder, f)) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
      out.append(np.asarray(im, np.uint8))
  return np.stack(out)


# --- computation -----------------------------------------------------------------------

def _maps_fn(run: Run, sizes: Tuple[int, ...]):
  """jitted (variables, uint8 (B,S,S,3), key) -> (input [-1,1], channel maps, spatial maps)."""
  key = tuple(sizes)
  if key not in run._fns:
    from askd_jax.data.degrade import make_degrade
    deg = make_degrade(run.degrade_cfg(sizes)) if sizes else None
    task, model = run.task, run.model

    @jax.jit
    def fn(variables, images, rng):
      x = task.preprocess({"image": images})  # (B, S, S, 3) in [-1, 1]
      if deg is not None:
        x = deg(x, rng)
      (_, feats), _ = task.forward(model, variables, x, {}, train=False)
      return x, feats.channel_maps, feats.spatial_maps

    run._fns[key] = fn
  return run._fns[key]


def attention_maps(run: Run, stage: Stage, images: np.ndarray, batch: int = 64,
                   seed: int = 0) -> Dict[str, Any]:
  """The stage's input and pre-sigmoid maps for uint8 images (N, S, S, 3).

  Returns {'images': the uint8 images, 'inputs': (N,S,S,3) f32 in [-1,1] (what the model
  sees), 'channel': [(N,C_k)], 'spatial': [(N,h_k,w_k)]}, one list entry per CBAM block.
  Students see their own degradation (seeded, reproducible). Batches are padded to `batch`
  so every call reuses one compiled shape.
  """
  images = np.asarray(images, np.uint8)
  s = run.task.input_size
  if images.ndim != 4 or images.shape[1:] != (s, s, 3):
    raise ValueError(f"images have shape {images.shape}; the model takes (N, {s}, {s}, 3) uint8 "
                     "(use load_image_folder to resize a folder of faces)")
  fn = _maps_fn(run, stage.sizes)
  key = jax.random.key(seed)
  parts = []
  for i in range(0, len(images), batch):
    chunk = images[i:i + batch]
    pad = batch - len(chunk)
    if pad:  # one compiled shape for every call
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    out = jax.device_get(fn(stage.variables, chunk, jax.random.fold_in(key, i)))
    parts.append(jax.tree.map(lambda a: np.asarray(a)[:batch - pad], out))
  x, ch, sp = jax.tree.map(lambda *a: np.concatenate(a), *parts)
  return {"images": images, "inputs": x, "channel": list(ch), "spatial": list(sp)}


def cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """Per-sample cosine of flattened maps (torch F.cosine_similarity semantics). (N,...) -> (N,)"""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  if a.shape != b.shape:
    raise ValueError(f"maps of shape {a.shape} and {b.shape} cannot be compared; student and "
                     "teacher need the same block layout and input size")
  na = np.maximum(np.linalg.norm(a, axis=1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=1), eps)
  return np.sum((a / na[:, None]) * (b / nb[:, None]), axis=1)


def block_similarity(student: Sequence[np.ndarray],
                     teacher: Sequence[np.ndarray]) -> np.ndarray:
  """Mean over samples of the per-sample cosine, one value per block. -> (num_blocks,)"""
  if len(student) != len(teacher):
    raise ValueError(f"student has {len(student)} attention blocks, teacher {len(teacher)}")
  return np.array([float(np.mean(cosine(s, t))) for s, t in zip(student, teacher)])


def spatial_heatmaps(spatial: Sequence[np.ndarray], size: int) -> np.ndarray:
  """sigmoid(pre-sigmoid maps) bilinearly upsampled: [(N,h_k,w_k)] -> (N, K, size, size) in [0,1]."""
  ups = []
  for m in spatial:
    p = jax.nn.sigmoid(jnp.asarray(m, jnp.float32))[..., None]  # (N, h, w, 1)
    ups.append(jax.image.resize(p, (p.shape[0], size, size, 1), "linear")[..., 0])
  return np.clip(np.stack([np.asarray(u) for u in ups], axis=1), 0.0, 1.0)


def similarities(run: Run, images: np.ndarray, batch: int = 64) -> Dict[str, Any]:
  """Per-block cosine of every student's channel and spatial maps to the teacher's.

  Returns {'num_blocks', 'block_shapes': [[h, w, C]], 'students': {stage: {'method', 'sizes',
  'channel': [K], 'spatial': [K]}}}.
  """
  t = attention_maps(run, run.teacher, images, batch)
  out = {"num_blocks": len(t["channel"]),
         "block_shapes": [[int(sp.shape[1]), int(sp.shape[2]), int(ch.shape[1])]
                          for ch, sp in zip(t["channel"], t["spatial"])],
         "students": {}}
  for st in run.students:
    s = attention_maps(run, st, images, batch)
    out["students"][st.name] = {
        "method": st.method, "sizes": list(st.sizes), "label": st.label,
        "channel": block_similarity(s["channel"], t["channel"]).tolist(),
        "spatial": block_similarity(s["spatial"], t["spatial"]).tolist()}
  return out


def compare(sims: Dict[str, Any], method: str = "askd", baseline: str = "none") -> Dict[str, Any]:
  """For each size holding both students: blocks where `method` is closer to the teacher."""
  by = {(v["method"], tuple(v["sizes"])): v for v in sims["students"].values()}
  out = {}
  for (m, sizes), v in sorted(by.items()):
    base = by.get((baseline, sizes))
    if m != method or base is None:
      continue
    row = {}
    for kind in ("channel", "spatial"):
      a, b = np.array(v[kind]), np.array(base[kind])
      row[kind] = {"higher_blocks": int(np.sum(a > b)), "num_blocks": len(a),
                   "mean_" + method: float(a.mean()), "mean_" + baseline: float(b.mean())}
    out["/".join(map(str, sizes))] = row
  return out


# --- figures ---------------------------------------------------------------------------

def _show_image(ax, x: np.ndarray) -> None:
  ax.imshow(np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0))


def attention_grid(stages: Sequence[Stage], maps: Sequence[Dict[str, Any]], index: int = 0,
                   normalize: bool = True, title: str = ""):
  """One figure for image `index` of `maps` (attention_maps of each stage, same images).

  Rows: the image, then each stage (teacher first); column 0 shows the input each model
  sees (HR or its LR degradation), columns 1..K the spatial attention of block k over the
  HR image. normalize stretches each heat map to its own 2nd..98th percentile (the sigmoid
  values of one block often span a narrow range, and a border pixel can be an outlier);
  the spatial cosine to the teacher (pre-sigmoid, this image) is printed per cell.
  """
  import matplotlib.pyplot as plt
  hr = maps[0]["images"][index].astype(np.float32) / 127.5 - 1.0
  size = hr.shape[0]
  k = len(maps[0]["spatial"])
  teacher = maps[0] if stages[0].method == "teacher" else None
  cell = 1.45
  fig, axes = plt.subplots(len(stages) + 1, k + 1,
                           figsize=(cell * (k + 1), cell * (len(stages) + 1)), squeeze=False)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
      sp.set_visible(False)
  _show_image(axes[0, 0], hr)
  axes[0, 0].set_ylabel("image", fontsize=8)
  for j in range(k):
    h, w = maps[0]["spatial"][j].shape[1:]
    axes[0, j + 1].set_title(f"block {j + 1} ({h}x{w})", fontsize=8)
    axes[0, j + 1].axis("off")
  for i, (st, m) in enumerate(zip(stages, maps), start=1):
    heat = spatial_heatmaps([sp[index:index + 1] for sp in m["spatial"]], size)[0]  # (K, S, S)
    _show_image(axes[i, 0], m["inputs"][index])
    axes[i, 0].set_ylabel(st.label, fontsize=8)
    for j in range(k):
      ax = axes[i, j + 1]
      hm = heat[j]
      lo, hi = (float(np.percentile(hm, 2)), float(np.percentile(hm, 98))) if normalize else (0.0, 1.0)
      if hi - lo < 1e-4:  # a flat (saturated) map: show its value on the absolute scale
        lo, hi = 0.0, 1.0
      _show_image(ax, hr)
      ax.imshow(hm, cmap="jet", alpha=0.5, vmin=lo, vmax=hi, interpolation="bilinear")
      if teacher is not None and m is not teacher:
        c = float(cosine(m["spatial"][j][index:index + 1], teacher["spatial"][j][index:index + 1])[0])
        ax.text(0.03, 0.03, f"cos {c:.2f}", transform=ax.transAxes, fontsize=7, color="white",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def similarity_plot(sims: Dict[str, Any], title: str = ""):
  """Per-block cosine to the teacher, one line per student; channel and spatial panels."""
  import matplotlib.pyplot as plt
  k = sims["num_blocks"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
  blocks = np.arange(1, k + 1)
  styles = {"none": ("tab:gray", "o"), "askd": ("tab:red", "s"), "at": ("tab:blue", "^"),
            "fkd": ("tab:green", "v"), "horkd": ("tab:purple", "D")}
  for ax, kind in zip(axes, ("channel", "spatial")):
    for v in sims["students"].values():
      color, marker = styles.get(v["method"], ("black", "x"))
      ls = "-" if v["sizes"][0] == min(s["sizes"][0] for s in sims["students"].values()) else "--"
      ax.plot(blocks, v[kind], ls, color=color, marker=marker, label=v["label"], markersize=4)
    ax.set_title(f"{kind} attention", fontsize=10)
    ax.set_xlabel("CBAM block")
    ax.set_xticks(blocks if k <= 24 else blocks[::4])
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cosine to teacher (pre-sigmoid)")
  axes[1].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


# --- verification scores (ROC) ---------------------------------------------------------

def pair_scores(run: Run, stage: Stage, sizes: Sequence[int] = ()) -> Dict[str, Dict[str, np.ndarray]]:
  """Cosine of the flip-concatenated embeddings of every verification pair.

  sizes: the LR sizes the images are degraded to (() = HR). Returns {set: {'scores' (P,),
  'issame' (P,) bool}}. Plain cosine (no per-fold centring as in the accuracy protocol).
  """
  out = {}
  for vs in run.task.data["verification"]:
    emb = run.task.embeddings(run.model, stage.variables, vs["images"], tuple(sizes),
                              batch=run.cfg.eval.get("batch_size", 64))
    out[vs["name"]] = {"scores": verification.cosine_scores(emb[vs["idx1"]], emb[vs["idx2"]]),
                       "issame": np.asarray(vs["issame"], bool)}
  return out


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
  """(false accept rate, true accept rate, AUC) over all thresholds (ties handled jointly)."""
  scores = np.asarray(scores, np.float64)
  issame = np.asarray(issame, bool)
  if issame.all() or not issame.any():
    raise ValueError("ROC needs both positive and negative pairs")
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], issame[order]
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each run of equal scores
  tpr = np.r_[0.0, np.cumsum(y)[last] / y.sum()]
  fpr = np.r_[0.0, np.cumsum(~y)[last] / (~y).sum()]
  return fpr, tpr, float(np.trapezoid(tpr, fpr))
