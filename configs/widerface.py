r"""Face detection with A-SKD (supplementary 2.2): `python -m askd_jax.main --config=configs/widerface.py[:PRESET]`.

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

Commands
  small      python -m askd_jax.main --config=configs/widerface.py --workdir=runs/widerface_small
             23.4 min wall (one run, seed 0) on a 2-core x86_64 CPU VM shared with other
             jobs (load ~4); its AP table: docs/widerface.md.
  widerface  python -m askd_jax.main --config=configs/widerface.py:widerface \
                 --config.data.manual_dir=/data/widerface --config.data.data_dir=/data/tfds \
                 --workdir=runs/widerface
             (the first run converts the released files to askd_wider_face in data_dir.)
             Not run at this scale in this project: no measured time; docs/widerface.md.
  widerface_x16 (x32 alike)
             python -m askd_jax.main --config=configs/widerface.py:widerface_x16 \
                 --config.data.data_dir=/data/tfds \
                 --config.student.teacher=runs/widerface/teacher --workdir=runs/widerface_x16
"""
from __future__ import annotations

import ml_collections

from askd_jax import config_blocks

WIDER_TRAIN_IMAGES = 12_880


def _base(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  config_blocks.run(c, task="detection", preset=preset)

  c.data = ml_collections.ConfigDict()
  c.data.name = "widerface"        # widerface (askd_wider_face) | synthetic (generated demo)
  c.data.manual_dir = ""           # widerface: WIDER_train/val (zips or folders), wider_face_split,
  c.data.data_dir = ""             #   eval_tools; data_dir: tfds folder ('' = ~/tensorflow_datasets)
  c.data.image_size = ml_collections.FieldReference(640)  # training crop / model input (HR)
  c.data.max_boxes = 400           # faces per training image (padded; static shapes)
  c.data.crop_choice = (0.3, 0.45, 0.6, 0.8, 1.0)  # RandomSquareCrop: side / short side
  c.data.flip = True
  c.data.workers = 8               # grain worker processes decoding JPEGs (0: in-process)
  c.data.prefetch = 2              # batches put on the devices ahead of the step
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
  c.model.backbone_init = ""       # ImageNet ResNet-CBAM to start from (a stage dir of
  #                                  configs/imagenet.py or an exported model); '' = scratch
  c.model.fpn_channels = 256
  c.model.stacked_convs = 4
  # gn: GroupNorm(32) in FPN, Inception and head, as TinaFace's published (GN + DCN) model;
  # bn: vedadet's BN variant. Inception and the head are shared by the 6 levels: with
  # bn_per_level each level has its own BN there (convs shared); False is vedadet's one BN for
  # all levels, whose running statistics mix the levels (eval mode drifts from train mode).
  c.model.norm = "gn"
  c.model.bn_per_level = True

  c.loss = ml_collections.ConfigDict()  # askd_jax.detection.losses.DEFAULTS (TinaFace)
  c.loss.focal_gamma = 2.0
  c.loss.focal_alpha = 0.25
  c.loss.cls_weight = 1.0
  c.loss.box_weight = 2.0          # DIoU
  c.loss.iou_weight = 1.0          # IoU-prediction BCE
  c.loss.pos_iou_thr = 0.35
  c.loss.neg_iou_thr = 0.35
  c.loss.min_pos_iou = 0.35

  # The supplementary's recipe: SGD 150 epochs, lr 0.001, momentum 0.9 (plain, as vedadet),
  # weight decay 5e-4, batch 8; vedadet's 500 warm-up iterations, then a cosine.
  c.train = config_blocks.train(batch_size=8, epochs=150, lr=0.001, schedule="cosine",
                                warmup_epochs=500 / (WIDER_TRAIN_IMAGES // 8), nesterov=False)
  config_blocks.factor_students(c, (16, 32), methods=("none", "askd", "at", "fkd", "horkd"),
                                mode="area", blur="none")
  c.student.distill_maps = "stages"  # stages (last CBAM block of each stage) | all
  c.distill = config_blocks.distill()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 4            # letterboxed canvases per jitted call
  c.eval.dtype = "float32"         # whatever config.dtype ("train": in config.dtype)
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
  c = _base(preset)
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
