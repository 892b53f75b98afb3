"""Face recognition with A-SKD: `python -m askd_jax.main --config=configs/facerec.py[:PRESET]`.

Presets
  demo      (default) a small iResNet-CBAM on the ORL faces that ship with the project (28 people
            to train on, 12 unseen people for verification), 56 px input, students at 7 and
            14 px (8x and 4x down-sampling, the paper's 14 and 28 px at 112). CPU, minutes.
  casia     the paper's recipe: iResNet50-CBAM, CASIA-WebFace (insightface RecordIO),
            batch 128, SGD lr 0.1 x0.1 from epochs 5, 10, 14, 16 (0-based) of 20 (the official
            per-epoch rates, see train.lr_boundaries below), students at 14/28/56 px,
            A-SKD weight 5.0; verification on LFW / AgeDB-30 / CFP-FP .bin files.
  tinyface  the official TinyFace experiment: the casia teacher, a 24 px student evaluated by
            rank-k identification on TinyFace.

Every field can be overridden: --config.train.batch_size=64 --config.student.methods=none,askd,at
"""
from __future__ import annotations

import ml_collections

from askd_jax import config_blocks


def _base(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  config_blocks.run(c, task="facerec", preset=preset)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = ""             # insightface builder name (casia_webface, ms1m...)
  c.data.name = "orl"              # orl | insightface (RecordIO / list file, see docs/datasets.md)
  c.data.data_dir = ""             # tfds data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.manual_dir = ""           # where the user's raw files are (real data sets)
  c.data.image_size = 112          # model input (HR) size
  c.data.augment = "flip"          # flip (official) | demo (flip, shift/scale, brightness) | none
  c.data.workers = 0               # grain worker processes for decoding
  c.data.verification = ("lfw", "agedb_30", "cfp_fp")  # prepared .bin sets (real data)
  c.data.tinyface = False
  c.data.num_pairs = 600           # demo only

  c.model = ml_collections.ConfigDict()
  c.model.depth = 50               # 50 | 100 | 152 (ignored when stage_sizes is set)
  c.model.width = 1.0              # channel multiplier (1.0 = 64/128/256/512)
  c.model.stage_sizes = ()         # e.g. (1, 1, 1, 1) for a small variant
  c.model.embedding_dim = 512
  c.model.dropout = 0.4
  c.model.margin = "arcface"       # arcface | cosface
  c.model.s = 32.0
  c.model.m = 0.5

  # The official recipe: SGD, Nesterov momentum 0.9, weight decay 5e-4 on every parameter,
  # MultiStepLR(milestones=[6, 11, 15, 17]) stepped at the START of every epoch (before any
  # optimizer step), so the per-epoch rates are 0.1 x5, 0.01 x5, 1e-3 x4, 1e-4 x2, 1e-5 x4:
  # here lr_boundaries are the 0-based epochs where a rate starts, hence (5, 10, 14, 16).
  # The plain reading of the milestones (0.1 x6, ..., 1e-5 x3) is
  # --config.train.lr_boundaries=6,11,15,17. Pinned by tests/test_official_schedule.py.
  c.train = config_blocks.train(batch_size=128, epochs=20, lr=0.1, schedule="step",
                                lr_boundaries=(5, 10, 14, 16), log_every=50,
                                checkpoint_every=1000)
  c.student = config_blocks.student(sizes=(14, 28, 56), methods=("none", "askd"))
  c.distill = config_blocks.distill()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  return c


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  preset = preset or "demo"
  c = _base(preset)
  if preset == "demo":
    c.data.name = "orl"
    c.data.image_size = 56
    c.data.augment = "demo"
    c.model.width = 0.25
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.embedding_dim = 128
    c.model.dropout = 0.2
    c.train.batch_size = 32
    c.train.epochs = 30
    c.train.lr_boundaries = (18, 24, 27)
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.student.sizes = (7, 14)
  elif preset == "casia":
    c.data.name = "insightface"
    c.data.dataset = "casia"
  elif preset == "tinyface":
    c.data.name = "insightface"
    c.data.dataset = "casia"
    c.data.tinyface = True         # also rank-1/5/10/20 identification on prepared TinyFace
    c.data.verification = ()
    c.student.sizes = (24,)
  else:
    raise ValueError(f"preset {preset!r} is unknown; use demo, casia or tinyface")
  return c
