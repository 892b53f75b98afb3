"""Prepare face data sets from the files you hold (nothing is downloaded).

    python -m askd_jax.data.prepare --dataset=casia --manual_dir=DIR --data_dir=DATA_DIR
    python -m askd_jax.data.prepare --dataset=lfw,agedb_30,cfp_fp --manual_dir=DIR --data_dir=DATA_DIR
    python -m askd_jax.data.prepare --dataset=imagenet --manual_dir=DIR --data_dir=DATA_DIR
    python -m askd_jax.data.prepare --dataset=ijbc --manual_dir=DIR --data_dir=DATA_DIR

--dataset (comma-separated): casia, ms1m, rec (insightface train.rec/.idx), casia_list, list
(image folder + list file), lfw, agedb_30, cfp_fp, cfp_ff, calfw, cplfw, vgg2_fp (insightface
.bin), tinyface; imagenet (ILSVRC2012_img_{train,val}.tar, configs/imagenet.py), widerface
(the WIDER FACE release, configs/widerface.py); ijbb, ijbc (insightface's IJB release:
loose_crop/ + meta/, aligned here with the 5 points; askd_jax/data/ijb.py). Writes
array_record under DATA_DIR; see docs/datasets.md.
"""
from __future__ import annotations

from absl import app, flags

from askd_jax import stop
from askd_jax.data import faces


def _imagenet(manual_dir, data_dir):
  from askd_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  return imagenet.prepare(manual_dir, data_dir)


def _widerface(manual_dir, data_dir):
  from askd_jax.data import widerface  # pylint: disable=g-import-not-at-top
  return widerface.prepare(manual_dir, data_dir)


def _ijb(name):
  def prep(manual_dir, data_dir):
    from askd_jax.data import ijb  # pylint: disable=g-import-not-at-top
    with stop.handling():
      return ijb.prepare(name, manual_dir, data_dir)
  return prep


# builders outside data.faces: other tasks, and IJB (evaluation only)
OTHER = {"imagenet": _imagenet, "widerface": _widerface, "ijbb": _ijb("ijbb"),
         "ijbc": _ijb("ijbc")}
NAMES = sorted(faces.DATASETS) + sorted(OTHER)

FLAGS = flags.FLAGS
flags.DEFINE_list("dataset", None, f"one or more of {NAMES}")
flags.DEFINE_string("manual_dir", None, "folder holding the files as distributed")
flags.DEFINE_string("data_dir", None, "where the prepared array_record sets go")
flags.DEFINE_enum("on_corrupt", "skip", list(faces.ON_CORRUPT),
                  "undecodable image: skip (counted in the metadata), error, keep (no check)")
flags.DEFINE_string("list_file", None, "list/casia_list: the list file (default "
                    "MANUAL_DIR/train.list)")
flags.DEFINE_string("bin_file", None, "a verification set: the .bin (default "
                    "MANUAL_DIR/<dataset>.bin)")


def main(argv):
  del argv
  for name in ("dataset", "manual_dir", "data_dir"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  for dataset in FLAGS.dataset:
    if dataset not in NAMES:
      raise app.UsageError(f"--dataset={dataset}: use one of {NAMES}")
    if dataset in OTHER:
      try:
        b = OTHER[dataset](FLAGS.manual_dir, FLAGS.data_dir)
      except stop.Preempted as e:
        print(f"prepare --dataset={dataset}: {e}")
        raise SystemExit(0) from None
      except (OSError, ValueError) as e:
        raise SystemExit(f"prepare --dataset={dataset}: {e}") from None
      print(f"{dataset}: {b.data_dir} { {k: v.num_examples for k, v in b.info.splits.items()} }")
      continue
    kwargs = {"on_corrupt": FLAGS.on_corrupt}
    cls = faces.DATASETS[dataset][0]
    if cls is faces.FaceImageList and FLAGS.list_file:
      kwargs["list_file"] = FLAGS.list_file
    if cls is faces.FaceVerification and FLAGS.bin_file:
      if len(FLAGS.dataset) > 1:
        raise app.UsageError("--bin_file names one .bin: prepare one --dataset at a time")
      kwargs["bin_file"] = FLAGS.bin_file
    try:
      with stop.handling():
        b = faces.prepare(dataset, FLAGS.manual_dir, FLAGS.data_dir, **kwargs)
    except stop.Preempted as e:  # SIGTERM/SIGINT: tfds writes to a temporary folder first
      print(f"prepare --dataset={dataset}: {e}")
      raise SystemExit(0) from None
    except (OSError, ValueError) as e:  # one line naming the file, no traceback
      raise SystemExit(f"prepare --dataset={dataset}: {e}") from None
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"{dataset}: {b.data_dir} {splits} {dict(b.info.metadata)}")


if __name__ == "__main__":
  app.run(main)
