"""Face detection with A-SKD (supplementary 2.2): `python -m askd_jax.main --config=configs/widerface.py[:PRESET]`.

Presets
  small      (default) offline demo: a tiny TinaFace-CBAM (one bottleneck per stage, width 8,
             FPN 32 channels, 2-conv towers) on generated 128 px images with 1-6 drawn faces
             (askd_jax/data/synthetic_faces.py; 4,000 train / 200 val images, built on the
             fly), teacher on HR, then a student at 16x down-sampling (8 px, seen up-sampled
             to 128) without distillation and with A-SKD; AP of the official WIDER FACE
             protocol on the val images (every face kept in every difficulty). CPU, minutes.
  widerface  the paper's recipe: TinaFace with a ResNet-50-CBAM backbone on WIDER FACE
             (askd_wider_face, built from the released files in data.manual_dir), SGD 150
             epochs, lr 0.001, momentum 0.9, weight decay 5e-4, batch 8, 640x640
             RandomSquareCrop training crops (TinaFace); then students at 16x and 32x
             down-sampling (40 and 20 px, seen up-sampled to 640) with no distillation,
             A-SKD and the baselines AT, F-KD, HORKD; NMS IoU 0.4, score threshold 0.02.
  widerface_x16, widerface_x32
             the same recipe, students at one factor only; with --config.student.teacher=DIR
             they reuse a trained teacher instead of training one.

Choices the supplementary leaves open (see docs/widerface.md):
  * schedule: vedadet's TinaFace warms up linearly for 500 iterations (from 0.1 x lr; the
    loop's warm-up starts at 0) and then runs cosine restarts every 30 epochs down to
    0.01 x lr; here 500 iterations of warm-up (warmup_epochs = 500 / (12,880 // 8)) then one
    cosine decay over the 150 epochs. Plain (not Nesterov) momentum, as vedadet.
  * LR images: box-average down-sampling (student.mode=area) then bilinear up-sampling, no
    blur (the supplementary mentions none); student.mode=official / student.blur=official
    give the face recipe's nearest resize + fixed Gaussian blur.
  * distillation on the last CBAM block of each of the four ResNet stages
    (student.distill_maps=stages; 'all' distils every block), A-SKD weight 5.0 as for faces.
  * evaluation: each val image letterboxed into an eval.image_size square (1024: WIDER
    images are 1024 px wide), students' canvases degraded by the same factor.
  * data.max_boxes faces per training crop (the largest; the rest are dropped).
  * model.norm=gn: GroupNorm in the neck and head as the published TinaFace (no deformable
    convolutions; the backbone keeps BN).

Down-sampling factors: student.factors; student.sizes follows them (image_size // factor)
unless set itself:  --config.student.factors=16  or  --config.student.sizes=40
Every other field can be overridden too: --config.train.batch_size=16
"""
from __future__ import annotations

from typing import Tuple

import ml_collections
from ml_collections import config_dict

WIDER_TRAIN_IMAGES = 12_880


def _sizes_from_factors(factors_ref: config_dict.FieldReference,
                        size_ref: config_dict.FieldReference) -> config_dict.FieldReference:
  """A lazy tuple: image_size // f for each factor, re-evaluated after command-line overrides."""
  def fn(factors: Tuple[int, ...]) -> Tuple[int, ...]:
    size = size_ref.get()
    for f in factors:
      if not isinstance(f, int) or f < 1 or size % f:
        raise ValueError(f"config.student.factors has {f!r}: factors must be integers >= 1 "
                         f"dividing data.image_size={size}")
    return tuple(size // f for f in factors)
  return factors_ref._apply_op(fn)  # pylint: disable=protected-access  (no public lazy map)


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "detection"
  c.preset = "widerface"
  c.seed = 0
  c.dtype = "float32"              # compute dtype (bfloat16 on GPU/TPU works; losses stay f32)
  c.distributed = False
  c.shard_params_min_size = 0
  c.jax_cache_dir = "~/.cache/askd_jax/xla"  # persistent compilation cache ('' to disable)

  c.data = ml_collections.ConfigDict()
  c.data.name = "widerface"        # widerface (askd_wider_face) | synthetic (generated demo)
  c.data.manual_dir = ""           # widerface: WIDER_train/val (zips or folders), wider_face_split,
  c.data.data_dir = ""             #   eval_tools; data_dir: tfds folder ('' = ~/tensorflow_datasets)
  c.data.image_size = ml_collections.FieldReference(640)  # training crop / model input (HR)
  c.data.max_boxes = 400           # faces per training image (padded; static shapes)
  c.data.crop_choice = (0.3, 0.45, 0.6, 0.8, 1.0)  # RandomSquareCrop: side / short side
  c.data.flip = True
  c.data.workers = 8               # grain worker processes decoding JPEGs (0: in-process)
  # synthetic only
  c.data.num_train = 0
  c.data.num_val = 0
  c.data.max_faces = 6
  c.data.min_face = 16
  c.data.max_face = 48
  c.data.kind = "drawn"            # drawn | orl (the project's ORL photos pasted in)

  c.model = ml_collections.ConfigDict()
  c.model.depth = 50
  c.model.width = 64               # stem / first-stage channels (64 = ResNet-50)
  c.model.stage_sizes = ()         # blocks per stage; () = the depth's standard layout
  c.model.fpn_channels = 256
  c.model.stacked_convs = 4
  # gn: GroupNorm(32) in FPN, Inception and head, as TinaFace's published (GN + DCN) model;
  # bn: vedadet's BN variant, whose BN in the level-shared Inception and head keeps one set of
  # running statistics mixed over the 6 levels (eval-mode outputs drift from train mode).
  c.model.norm = "gn"

  c.loss = ml_collections.ConfigDict()  # askd_jax.detection.losses.DEFAULTS (TinaFace)
  c.loss.focal_gamma = 2.0
  c.loss.focal_alpha = 0.25
  c.loss.cls_weight = 1.0
  c.loss.box_weight = 2.0          # DIoU
  c.loss.iou_weight = 1.0          # IoU-prediction BCE
  c.loss.pos_iou_thr = 0.35
  c.loss.neg_iou_thr = 0.35
  c.loss.min_pos_iou = 0.35

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8
  c.train.epochs = 150
  c.train.steps = 0                # >0 overrides epochs
  c.train.lr = 0.001
  c.train.schedule = "cosine"      # cosine (after warm-up) | step
  c.train.warmup_epochs = 500 / (WIDER_TRAIN_IMAGES // 8)  # vedadet: 500 iterations
  c.train.lr_boundaries = ()       # schedule=step only
  c.train.lr_factor = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.keep = 2
  c.train.nan_policy = "stop"
  c.train.max_bad_steps = 100

  c.student = ml_collections.ConfigDict()
  c.student.factors = ml_collections.FieldReference((16, 32))
  c.student.sizes = _sizes_from_factors(c.student.get_ref("factors"), c.data.get_ref("image_size"))
  c.student.methods = ("none", "askd", "at", "fkd", "horkd")
  c.student.teacher = ""           # trained teacher dir ('' = train one in WORKDIR/teacher)
  c.student.mode = "area"          # down-sampling: area (box) | bilinear | bicubic | official
  c.student.blur = "none"          # none | official | random
  c.student.distill_maps = "stages"  # stages (last CBAM block of each stage) | all
  c.student.eval_teacher_lr = True  # also evaluate the teacher on each LR factor

  c.distill = ml_collections.ConfigDict()
  c.distill.askd = ml_collections.ConfigDict({"weight": 5.0})
  c.distill.at = ml_collections.ConfigDict({"weight": 1000.0})
  c.distill.fkd = ml_collections.ConfigDict({"weight": 1.0})
  c.distill.horkd = ml_collections.ConfigDict(
      {"weight": 1.0, "individual": 1.0, "pair": 0.1, "triplet": 0.2, "group": 0.1})

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 4            # letterboxed canvases per jitted call
  c.eval.image_size = 1024         # square evaluation canvas (0 = data.image_size)
  c.eval.score_thr = 0.02          # the paper's confidence level
  c.eval.nms_iou = 0.4             # the paper's NMS threshold
  c.eval.max_det = 1000            # detections kept per image
  c.eval.pre_nms_topk = 10000      # best-scoring anchors entering NMS
  c.eval.alpha = 0.4               # score = cls^(2 alpha) * iou^(2 (1 - alpha)) (vedadet)
  c.eval.min_size = 1.0            # drop boxes with sqrt(area) below this (canvas pixels)
  return c


def get_config(preset: str = "small") -> ml_collections.ConfigDict:
  preset = preset or "small"
  c = _base()
  c.preset = preset
  if preset == "small":
    c.data.name = "synthetic"
    c.data.image_size = 128
    c.data.max_boxes = 8
    c.data.workers = 0
    c.data.num_train = 4000
    c.data.num_val = 200
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 8
    c.model.fpn_channels = 32
    c.model.stacked_convs = 2
    c.model.norm = "bn"            # GroupNorm(32) needs >= 32 channels per Inception branch
    c.train.batch_size = 16
    c.train.steps = 400
    c.train.lr = 0.02
    c.train.warmup_epochs = 0.2
    c.train.nesterov = True
    c.train.log_every = 20
    c.train.checkpoint_every = 0
    c.student.factors = (16,)
    c.student.methods = ("none", "askd")
    c.eval.batch_size = 50
    c.eval.image_size = 0
    c.eval.max_det = 100
    c.eval.pre_nms_topk = 1000
  elif preset == "widerface":
    pass
  elif preset in ("widerface_x16", "widerface_x32"):
    c.student.factors = (int(preset[-2:]),)
  else:
    raise ValueError(f"preset {preset!r} is unknown; use small, widerface, widerface_x16 or "
                     "widerface_x32")
  return c
