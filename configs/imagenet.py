r"""Object classification with A-SKD (supplementary 2.1): `python -m askd_jax.main --config=configs/imagenet.py[:PRESET]`.

Presets
  small      (default) offline demo: a ResNet18-CBAM of width 16 on generated 32 px shapes
             (10 classes, 5,000 train / 1,000 test images, built on first use; 5 epochs at
             batch 32), teacher at 32 px,
             students at 4x down-sampling (8 px, seen up-sampled to 32) without distillation
             and with A-SKD. CPU, minutes.
  imagenet   the paper's recipe: ResNet50-CBAM on ImageNet-1k (askd_imagenet2012, built from
             the image-net.org tars in data.manual_dir), SGD 90 epochs, lr 0.4, batch 1024,
             momentum 0.9, weight decay 1e-4, bfloat16 compute; Inception crop + flip to 224,
             resize-256 / centre-crop-224 evaluation, top-1 / top-5; then students at 2x, 4x
             and 8x down-sampling (112, 56, 28 px, seen up-sampled to 224) with no
             distillation, A-SKD and the baselines AT, F-KD, HORKD.
  imagenet_x2, imagenet_x4, imagenet_x8
             the same recipe, students at one factor only; with --config.student.teacher=DIR
             they reuse a trained teacher instead of training one.

Choices the supplementary leaves open (see docs/imagenet.md):
  * schedule: 5 warm-up epochs (linear from 0) then cosine decay to 0 (the Flax ImageNet
    example's schedule for lr = 0.1 x batch / 256); --config.train.schedule=step gives
    x0.1 at train.lr_boundaries (30, 60, 80) instead.
  * weight decay 1e-4 on every parameter, BN scales/biases and the classifier bias included,
    as torch.optim.SGD(model.parameters(), weight_decay=1e-4) does (torchvision's default).
  * plain (not Nesterov) momentum, as torchvision's ImageNet reference.
  * LR images: box-average down-sampling (student.mode=area, as in "A Downsampled Variant
    of ImageNet", Chrabaszcz et al. 2017) then bilinear up-sampling, no blur (the
    supplementary mentions none); student.mode=official / student.blur=official give the
    face recipe's nearest resize + fixed Gaussian blur.

Down-sampling factors: student.factors; student.sizes follows them (image_size // factor)
unless set itself:  --config.student.factors=2,4  or  --config.student.sizes=56
Every other field can be overridden too: --config.train.batch_size=256

Commands
  small      python -m askd_jax.main --config=configs/imagenet.py:small \
                 --workdir=runs/imagenet_small
             9.1 min wall (one run, seed 0) on a 2-core x86_64 CPU VM shared with other
             jobs (load ~15); its table: docs/imagenet.md.
  imagenet   python -m askd_jax.main --config=configs/imagenet.py:imagenet \
                 --config.data.manual_dir=/data/imagenet --config.data.data_dir=/data/tfds \
                 --workdir=runs/imagenet
             (the first run converts the tars to askd_imagenet2012 in data_dir; afterwards
             data_dir alone is enough.) Not run at this scale in this project: no measured
             time; docs/imagenet.md.
  imagenet_x4 (x2, x8 alike)
             python -m askd_jax.main --config=configs/imagenet.py:imagenet_x4 \
                 --config.data.data_dir=/data/tfds \
                 --config.student.teacher=runs/imagenet/teacher --workdir=runs/imagenet_x4
"""
from __future__ import annotations

import ml_collections

from askd_jax import config_blocks


def _base(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  config_blocks.run(c, task="classification", preset=preset, dtype="bfloat16")

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet"         # imagenet (askd_imagenet2012) | shapes (generated demo)
  c.data.data_dir = ""             # tfds data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.manual_dir = ""           # imagenet: the folder with ILSVRC2012_img_{train,val}.tar
  c.data.validation_labels = ""    # imagenet: '' = tfds's validation_labels.txt (same format)
  c.data.image_size = ml_collections.FieldReference(224)  # model input (HR) size
  c.data.eval_resize = 256         # eval: shorter side -> eval_resize, centre crop image_size
  c.data.crop_scale = (0.08, 1.0)  # train: Inception crop area range
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.workers = 16              # grain worker processes decoding JPEGs (0: in-process)
  c.data.prefetch = 2              # batches put on the devices ahead of the step
  c.data.num_train = 0             # shapes only: generated images per split
  c.data.num_test = 0

  c.model = ml_collections.ConfigDict()
  c.model.depth = 50               # 18 | 34 | 50 | 101
  c.model.width = 64               # stem / first-stage channels (64 = the standard model)
  c.model.stage_sizes = ()         # blocks per stage; () = the depth's standard layout

  # torchvision's ResNet recipe at batch 1024 (lr 0.1 x batch / 256), cosine after 5 epochs
  # of warm-up, plain momentum, weight decay 1e-4 on every parameter.
  c.train = config_blocks.train(batch_size=1024, epochs=90, lr=0.4, schedule="cosine",
                                warmup_epochs=5.0, lr_boundaries=(30, 60, 80), nesterov=False,
                                weight_decay=1e-4)
  config_blocks.factor_students(c, (2, 4, 8), methods=("none", "askd", "at", "fkd", "horkd"),
                                mode="area", blur="none")
  c.distill = config_blocks.distill()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1000         # global; a multiple of the device count
  c.eval.dtype = "float32"         # whatever config.dtype ("train": in config.dtype)
  c.eval.topk = (1, 5)
  return c


def get_config(preset: str = "small") -> ml_collections.ConfigDict:
  preset = preset or "small"
  c = _base(preset)
  if preset == "small":
    c.dtype = "float32"            # bfloat16 brings nothing on a CPU
    c.data.name = "shapes"
    c.data.image_size = 32
    c.data.eval_resize = 32        # the whole generated image (no centre crop)
    c.data.crop_scale = (0.8, 1.0)  # a milder crop: the shape must stay in view
    c.data.workers = 0
    c.data.num_train = 5000
    c.data.num_test = 1000
    c.model.depth = 18
    c.model.width = 16
    c.train.batch_size = 32        # more updates per image: a few epochs is all a CPU affords
    c.train.epochs = 5
    c.train.lr = 0.1
    c.train.warmup_epochs = 0.5
    c.train.weight_decay = 5e-4
    c.train.log_every = 20
    c.train.checkpoint_every = 0
    c.student.factors = (4,)
    c.student.methods = ("none", "askd")
    c.eval.batch_size = 200
  elif preset == "imagenet":
    pass
  elif preset in ("imagenet_x2", "imagenet_x4", "imagenet_x8"):
    c.student.factors = (int(preset[-1]),)
  else:
    raise ValueError(f"preset {preset!r} is unknown; use small, imagenet, imagenet_x2, "
                     "imagenet_x4 or imagenet_x8")
  return c
