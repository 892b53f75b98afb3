"""Face detection (supplementary 2.2): TinaFace-CBAM on WIDER FACE (or generated faces).

The teacher trains on high-resolution crops; students see the same batch down-sampled 16x
or 32x and up-sampled back (on device, in the train step), with a frozen teacher and one
distillation method, all through the shared train loop.

Batch: {'image': uint8 (B, S, S, 3), 'boxes': float32 (B, G, 4) x1y1x2y2 input pixels,
'valid': bool (B, G), 'label': int32 (B,)}; G = data.max_boxes (static for jit).
'label' is a per-image id: only HORKD's group term reads labels, and with it every image is
its own group (detection has no identities).

Distillation: the paper distils "the attention maps of the four ResNet blocks, not every
convolution layer"; with student.distill_maps='stages' (default) the Features handed to
the distillation method keep the CBAM maps of the last block of each of the four stages
(4 channel + 4 spatial maps); 'all' keeps every block's (16 + 16 in ResNet-50). The stage
outputs (AT) and the pooled C5 embedding (F-KD, HORKD) are unchanged.

Evaluation: every validation image is letterboxed into an eval.image_size square canvas
(longer side resized to the canvas, bottom/right padded with grey 128, which is 0 after
the [-1, 1] scaling), so one compiled shape serves all; a student's evaluation degrades
the whole canvas by the training factor (canvas // factor). Detections are decoded, scored,
thresholded (eval.score_thr) and NMS-ed (eval.nms_iou) on the canvas, divided by the
letterbox scale, clipped to the image and scored with the official WIDER FACE protocol
(askd_jax.evaluate.widerface).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from askd_jax import ops
from askd_jax.data import degrade as degrade_lib
from askd_jax.data.detection import letterbox, load_detection_data
from askd_jax.detection.losses import detection_loss
from askd_jax.detection.postprocess import postprocess
from askd_jax.evaluate.widerface import DIFFICULTIES, ImageGT, evaluate_widerface, image_key
from askd_jax.models.features import Features
from askd_jax.models.tinaface import TinaFaceCBAM, tinaface_cbam
from askd_jax.tasks.base import Task

log = logging.getLogger(__name__)
BATCH_KEYS = ("image", "boxes", "valid", "label")
DISTILL_MAPS = ("stages", "all")


class Detector(nn.Module):
  """The train loop's model signature around TinaFace-CBAM.

  __call__(x, labels=None, train) -> ({'cls', 'box', 'iou'}, Features). The detector shares
  this module's scope, so the parameters are the plain TinaFace tree (backbone, fpn,
  inception, head).
  """
  net: TinaFaceCBAM

  def setup(self):
    nn.share_scope(self, self.net)

  def __call__(self, x: jax.Array, labels: jax.Array | None = None, train: bool = False):
    del labels
    return self.net(x, train)


def stage_features(feats: Features, stage_sizes: Sequence[int], which: str = "stages"
                   ) -> Features:
  """Features with the CBAM maps of the last block of each stage ('stages') or all ('all')."""
  if which == "all":
    return feats
  if which != "stages":
    raise ValueError(f"student.distill_maps={which!r} is unknown; use one of {DISTILL_MAPS}")
  last = np.cumsum(stage_sizes) - 1
  if len(feats.channel_maps) != int(last[-1]) + 1:
    raise ValueError(f"features hold {len(feats.channel_maps)} CBAM blocks but the stage "
                     f"sizes {tuple(stage_sizes)} give {int(last[-1]) + 1}")
  return feats.replace(channel_maps=tuple(feats.channel_maps[i] for i in last),
                       spatial_maps=tuple(feats.spatial_maps[i] for i in last))


# --------------------------------------------------------------------------- the task

class DetectionTask(Task):
  name = "detection"
  report_caption = "AP (%) on `{set}` (WIDER FACE protocol: IoU 0.5, all-point VOC AP)"

  batch_keys = BATCH_KEYS

  def __init__(self, cfg):
    super().__init__(cfg)
    self.input_size = int(cfg.data.image_size)
    self.max_boxes = int(cfg.data.max_boxes)
    self._anchors: Dict[int, np.ndarray] = {}

  # --- data ------------------------------------------------------------------------------
  def load_data(self) -> Dict[str, Any]:
    return load_detection_data(self.cfg.data)

  def sample_batch(self, n: int) -> Dict[str, np.ndarray]:
    s, g = self.input_size, self.max_boxes
    return {"image": np.zeros((n, s, s, 3), np.uint8), "boxes": np.zeros((n, g, 4), np.float32),
            "valid": np.zeros((n, g), bool), "label": np.zeros((n,), np.int32)}

  # --- model -----------------------------------------------------------------------------
  def spec(self) -> Dict[str, Any]:
    m = self.cfg.model
    return {"task": "detection", "arch": "tinaface_cbam", "depth": int(m.depth),
            "width": int(m.width), "stage_sizes": list(m.stage_sizes) if m.stage_sizes else None,
            "fpn_channels": int(m.fpn_channels), "stacked_convs": int(m.stacked_convs),
            "norm": m.norm, "bn_per_level": bool(m.get("bn_per_level", True)),
            "input_size": self.input_size, "dataset": self.cfg.data.name,
            "channel_order": "rgb", "input_range": "[-1, 1]"}

  def model(self, dtype=jnp.float32, spec=None, platform=None):
    s = spec or self.spec()
    net = tinaface_cbam(s.get("depth", 50), s.get("width", 64), s.get("fpn_channels", 256),
                        s.get("stage_sizes") or None, stacked_convs=s.get("stacked_convs", 4),
                        norm=s.get("norm", "bn"),
                        # checkpoints written before the option had one BN for all levels
                        bn_per_level=s.get("bn_per_level", False), dtype=dtype,
                        cpu_ops=ops.on_cpu(platform))
    return Detector(net)

  def check_teacher(self, tspec, path):
    super().check_teacher(tspec, path)
    # the distilled maps must line up (a key the teacher's spec lacks is not checked)
    self._check_backbone(tspec, f"teacher {path}",
                         "point student.teacher at a matching checkpoint", missing_ok=True)

  def _check_backbone(self, other, what: str, fix: str, missing_ok: bool = False) -> None:
    """`other` (a model spec) must have this run's backbone depth, width and stages."""
    mine = self.spec()
    for k in ("depth", "width", "stage_sizes"):
      if (k in other or not missing_ok) and other.get(k) != mine[k]:
        raise ValueError(f"{what} has {k}={other.get(k)!r} but this run's model.{k} is "
                         f"{mine[k]!r}; set model.{k} to match or {fix}")

  def pretrained_variables(self):
    """The backbone of a trained ResNet-CBAM classifier (`model.backbone_init`: a stage
    directory of configs/imagenet.py, or an exported model), TinaFace's ImageNet start."""
    path = self.cfg.model.get("backbone_init", "")
    if not path:
      return None
    from askd_jax.train.checkpoint import load_model
    variables, spec = load_model(path)
    if spec.get("task") != "classification" or spec.get("arch") != "resnet_cbam":
      raise ValueError(f"model.backbone_init={path!r} holds a {spec.get('task')}/"
                       f"{spec.get('arch')} model; give an ImageNet ResNet-CBAM "
                       "(a stage of configs/imagenet.py) or clear model.backbone_init")
    self._check_backbone(spec, f"model.backbone_init={path!r}", "use a matching backbone")
    params = {k: v for k, v in variables["params"].items() if k != "fc"}  # the classifier
    return {"params": {"backbone": params},
            "batch_stats": {"backbone": variables.get("batch_stats", {})}}

  def _stage_sizes(self, model) -> Tuple[int, ...]:
    return tuple(model.net.stage_sizes)

  def anchors(self, size: int) -> np.ndarray:
    if size not in self._anchors:
      self._anchors[size] = self.model().net.anchors_for(size)
    return self._anchors[size]

  # --- one batch -------------------------------------------------------------------------
  def forward(self, model, variables, x, batch, *, train: bool, rngs=None):
    which = self.cfg.student.get("distill_maps", "stages")
    if train:
      (out, feats), new_state = model.apply(variables, x, None, train=True, rngs=rngs,
                                            mutable=["batch_stats"])
    else:
      (out, feats), new_state = model.apply(variables, x, None, train=False), {}
    return (out, stage_features(feats, self._stage_sizes(model), which)), new_state

  def loss(self, outputs, batch):
    anchors = self.anchors(self.input_size)
    return detection_loss(outputs, anchors, batch["boxes"], batch["valid"],
                          self.cfg.get("loss"))

  # --- evaluation ------------------------------------------------------------------------
  def eval_size(self) -> int:
    return int(self.cfg.eval.get("image_size") or self.input_size)

  def lr_sizes(self, sizes: Sequence[int], canvas: int) -> Tuple[int, ...]:
    """Training LR sizes (of data.image_size) -> the same down-sampling factor on the canvas."""
    out = []
    for s in sizes:
      lr = int(round(canvas * int(s) / self.input_size))
      if lr < 1:
        raise ValueError(f"LR size {s} of {self.input_size} px is below one pixel on the "
                         f"{canvas} px evaluation canvas; raise eval.image_size")
      out.append(lr)
    return tuple(out)

  def predict_fn(self, model, sizes: Sequence[int] = (), canvas: int | None = None):
    """jitted (variables, images uint8 (B, C, C, 3), scale (B,), key) -> postprocess dict."""
    from askd_jax.train.loop import student_degrade_cfg
    canvas = canvas or self.eval_size()
    lr = self.lr_sizes(sizes, canvas) if sizes else ()
    deg = degrade_lib.make_degrade(student_degrade_cfg(self.cfg.student, lr)) if lr else None
    anchors = jnp.asarray(model.net.anchors_for(canvas))
    e = self.cfg.eval

    @jax.jit
    def predict(variables, images, scale, key):
      x = self.preprocess({"image": images})
      if deg is not None:
        x = deg(x, key)
      (out, _), _ = self.forward(model, variables, x, {}, train=False)
      return postprocess(out, anchors, canvas, score_thr=float(e.score_thr),
                         nms_iou=float(e.nms_iou), max_det=int(e.max_det),
                         pre_nms_topk=int(e.pre_nms_topk), alpha=float(e.get("alpha", 0.4)),
                         min_size=float(e.get("min_size", 1.0)), scale=scale)

    return predict

  def predictions(self, model, variables, sizes: Sequence[int] = ()
                  ) -> Tuple[Dict[str, np.ndarray], List[ImageGT]]:
    """({image name: (N, 5) x1, y1, x2, y2, score in image pixels}, ground truth)."""
    canvas = self.eval_size()
    predict = self.predict_fn(model, tuple(sizes), canvas)
    batch = int(self.cfg.eval.batch_size)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    key = jax.random.key(self.cfg.get("seed", 0))
    preds: Dict[str, np.ndarray] = {}
    gts: List[ImageGT] = []
    pending: List[Tuple[str, Tuple[int, int], np.ndarray, float]] = []

    def flush(step: int):
      n = len(pending)
      imgs = np.stack([p[2] for p in pending] + [pending[-1][2]] * (batch - n))
      scale = np.array([p[3] for p in pending] + [pending[-1][3]] * (batch - n), np.float32)
      r = jax.device_get(predict(variables, imgs, scale, jax.random.fold_in(key, step)))
      for i, (name, (h, w), _, _) in enumerate(pending):
        v = np.asarray(r["valid"][i], bool)
        b = np.asarray(r["boxes"][i], np.float64)[v]
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h)
        s = np.asarray(r["scores"][i], np.float64)[v]
        preds[image_key(name)] = np.concatenate([b, s[:, None]], axis=1).reshape(-1, 5)
      pending.clear()

    step = 0
    for name, img, gt in self.data["val"]():
      canvas_img, scale = letterbox(img, canvas)
      pending.append((name, img.shape[:2], canvas_img, scale))
      gts.append(gt)
      if len(pending) == batch:
        flush(step)
        step += 1
    if pending:
      flush(step)
    return preds, gts

  def eval_data_identity(self):
    """`prepared_identity` of WIDER FACE's validation records; None for the synthetic set
    (its config fixes it)."""
    from askd_jax.data.prepared import prepared_identity
    d = self.data.get("val_dir")
    return prepared_identity(d, splits=("validation",)) if d else None

  def evaluate(self, model, variables, sizes=()) -> Dict[str, Any]:
    """{'<set>_<difficulty>': {'accuracy': AP, 'std': None, 'count': images}}."""
    preds, gts = self.predictions(model, variables, sizes)
    ap = evaluate_widerface(preds, gts)
    prefix = self.data["set"]
    return {f"{prefix}_{d}": {"accuracy": float(ap[d]), "std": None, "count": len(gts)}
            for d in DIFFICULTIES}


# --------------------------------------------------------------------------- baseline

def random_detections(gts: Sequence[ImageGT], image_sizes: Sequence[Tuple[int, int]],
                      per_image: int, width_range: Tuple[float, float],
                      ratio_range: Tuple[float, float] = (1.1, 1.5), seed: int = 0
                      ) -> Dict[str, np.ndarray]:
  """Chance-level detector: per image `per_image` boxes of width U(width_range), height
  width * U(ratio_range), uniformly placed inside the (H, W) image, scores U(0, 1).

  Knows the face size and shape prior of the data, so it is a generous chance baseline.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for gt, (h, w) in zip(gts, image_sizes):
    bw = rng.uniform(*width_range, per_image)
    bh = np.minimum(bw * rng.uniform(*ratio_range, per_image), h)
    bw = np.minimum(bw, w)
    x1 = rng.uniform(0, 1, per_image) * (w - bw)
    y1 = rng.uniform(0, 1, per_image) * (h - bh)
    out[image_key(gt.name)] = np.stack([x1, y1, x1 + bw, y1 + bh, rng.uniform(0, 1, per_image)],
                                       axis=1)
  return out


def random_baseline_ap(gts: Sequence[ImageGT], image_sizes: Sequence[Tuple[int, int]],
                       per_image: int, width_range: Tuple[float, float],
                       ratio_range: Tuple[float, float] = (1.1, 1.5), seed: int = 0
                       ) -> Dict[str, float]:
  """{'easy', 'medium', 'hard'} AP of `random_detections` through the same evaluator."""
  return evaluate_widerface(random_detections(gts, image_sizes, per_image, width_range,
                                              ratio_range, seed), gts)
