"""Use a trained face model: load it, embed aligned face crops, compare the embeddings.

    import askd_jax
    model = askd_jax.load("workdir/facerec_demo/teacher")  # or a student stage, a directory
                                                           # written by tools.convert, a .jaxexport
                                                           # or .onnx file (tools.export)
    emb = model.embed(["a.png", "b.png"])                  # (2, 2 * D) float32
    model.similarity(emb[0], emb[1])                       # cosine
    model.embed(images, size=14)       # degraded as for a student evaluated at 14 px

An embedding is what the verification evaluation compares: concat(emb(x), emb(flip(x))) of
the eval-mode network, computed by the task's own embedding function
(`FaceRecTask.embed_fn`, the same jitted code as `python -m askd_jax.main --evaluate`), in
batches of one compiled shape. Images are RGB uint8 (H, W, 3) arrays or image files (any
format PIL reads; gray is replicated to RGB), already aligned and cropped to the model's input
size. A converted official checkpoint consumes BGR; its model.json says so
(channel_order=bgr) and the model reverses the channels itself, so callers always pass RGB.

`size` degrades the image as the A-SKD evaluation does for a student at that resolution
(nearest down to size x size and back up, then the official blur; the mode and blur of the
run that trained the model when its workdir's config.json is found). The network computes in
the evaluation's dtype (`experiment.eval_dtype`: float32 unless the config asks otherwise).

Verification thresholds come from the model's eval.json (askd_jax/evalfile.py): the
evaluation under the config the model was trained with (its workdir's config.json), or the
one named by `load(path, evaluation=...)` (an entry's key, its start, or a preset). Results
written for other weights than the directory holds now are never used.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
EVAL_FILE = "eval.json"  # askd_jax.evalfile.FILE
EXPORT_SUFFIX = ".jaxexport"
SIDECAR_SUFFIX = ".json"  # model.jaxexport.json: spec, degradation size, evaluation results
EXPORT_FORMAT = "askd_jax.export/1"
ONNX_FORMAT = "askd_jax.onnx/1"  # an .onnx file's metadata_props 'format' (tools/onnx_export.py)
ONNX_MEAN = 127.5  # its input: (x - 127.5) / 127.5, as insightface's ArcFace ONNX models
DEPLOY_EXTRAS = "pip install -r requirements-deploy.txt (jax2onnx, onnx, onnxruntime)"
ALIGN_HINT = ("align each face to the 5-point ArcFace template (e.g. insightface "
              "face_align.norm_crop, 112x112) and resize the crop to {s}x{s}")

ImageLike = Union[str, os.PathLike, np.ndarray]


class ModelError(ValueError):
  """Something the user gave that cannot be used; the message is one line naming it."""


class ImageError(ModelError):
  """An image file that does not decode."""


class ImageSizeError(ModelError):
  """An image that is not a face crop of the model's input size."""


# --- images ---------------------------------------------------------------------------------

def as_face(image: np.ndarray, input_size: int, where: str = "image") -> np.ndarray:
  """A uint8 (S, S, 3) RGB face crop, or ImageSizeError / ModelError naming `where`."""
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ModelError(f"{where}: dtype {a.dtype}; pass uint8 RGB pixels in 0..255")
  if a.ndim == 2:  # gray
    a = np.repeat(a[:, :, None], 3, axis=2)
  if a.ndim != 3 or a.shape[2] != 3:
    raise ModelError(f"{where}: shape {a.shape}; pass (H, W, 3) RGB images")
  if a.shape[:2] != (input_size, input_size):
    raise ImageSizeError(f"{where}: {a.shape[1]}x{a.shape[0]} pixels, but the model takes "
                         f"{input_size}x{input_size} aligned face crops; "
                         + ALIGN_HINT.format(s=input_size))
  return a


def read_image(path: Union[str, os.PathLike], input_size: int) -> np.ndarray:
  """An image file as a uint8 (S, S, 3) RGB face crop; ImageError if it does not decode."""
  from PIL import Image, UnidentifiedImageError
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageError(f"{path}: no such image file")
  try:
    with Image.open(path) as im:
      im.load()
      a = _to_rgb8(im, path)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
          Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    msg = str(e).splitlines()[0] if str(e) else ""
    raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {msg[:120]})") from None
  return as_face(a, input_size, path)


def _to_rgb8(im, path: str) -> np.ndarray:
  """uint8 RGB pixels of a decoded PIL image. PIL's convert("RGB") clips 16-bit grey
  (mode I;16*) to 255 instead of scaling it: those are scaled here (65535 -> 255); 48-bit RGB
  PNGs already decode to 8-bit RGB (the high bytes), palette and grey+alpha images convert
  as they are. 32-bit integer or float pixels (modes I, F: TIFF) have no known white level
  and are refused."""
  if im.mode.startswith("I;16"):
    a = np.asarray(im).astype(np.float32) * (255.0 / 65535.0)
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)
  if im.mode in ("I", "F"):
    raise ImageError(f"{path}: {'32-bit float' if im.mode == 'F' else '32-bit integer'} "
                     "pixels, whose white level is unknown; save the crop as an 8- or 16-bit "
                     "PNG or a JPEG")
  return np.asarray(im.convert("RGB"), np.uint8)


def list_images(source: Union[str, os.PathLike]) -> List[str]:
  """The image files of a folder (recursively, sorted) or of a list file (one path per line,
  relative paths taken from the list's folder; blank lines and '#' comments skipped)."""
  source = os.fspath(source)
  if os.path.isdir(source):
    out = []
    for dirpath, dirs, files in os.walk(source):
      dirs.sort()
      out += [os.path.join(dirpath, f) for f in sorted(files)
              if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    if not out:
      raise ModelError(f"{source}: holds no image files ({' '.join(IMAGE_EXTS)}); give a "
                       "folder of aligned face crops or a text file listing them")
    return out
  if not os.path.isfile(source):
    raise ModelError(f"{source}: no such folder or list file; give a folder of aligned face "
                     "crops or a text file with one image path per line")
  if os.path.splitext(source)[1].lower() in IMAGE_EXTS:
    return [source]
  base = os.path.dirname(source)
  with open(source, encoding="utf-8", errors="replace") as f:
    lines = [l.strip() for l in f]
  out = [l if os.path.isabs(l) else os.path.join(base, l) for l in lines
         if l and not l.startswith("#")]
  if not out:
    raise ModelError(f"{source}: the list names no image; write one image path per line")
  return out


# --- the model ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Threshold:
  """The verification threshold an evaluation chose: on `set_name` at `resolution`."""
  value: float
  set_name: str
  resolution: str  # 'HR' or the LR size, as keyed in eval.json
  accuracy: Optional[float] = None


class FaceModel:
  """A face embedder; build it with `askd_jax.load(path)`."""

  def __init__(self, path: str, spec: Dict[str, Any], batch_fn: Callable, *,
               evaluation: Optional[Dict[str, Any]] = None, fixed_size: Optional[int] = None,
               batch_size: int = 64, exportable=None, no_evaluation: str = "",
               traceable=None):
    self.path = path
    self.spec = spec
    self.input_size = int(spec["input_size"])
    self.evaluation = evaluation or {}  # {resolution: {set: results}} of one evaluation
    self._no_evaluation = no_evaluation  # why there is none, for the threshold's error
    self.batch_size = int(batch_size)
    self._batch_fn = batch_fn  # (uint8 (B, S, S, 3), size or None, start index) -> (B, 2D)
    self._fixed_size = fixed_size  # an export has its degradation built in
    self._exportable = exportable  # (size) -> (fn of uint8 images, description); in-project only
    self._traceable = traceable  # (size, flip) -> fn for converters (tools/onnx_export.py)

  def __repr__(self) -> str:
    return (f"FaceModel({self.path!r}, input {self.input_size}x{self.input_size}, "
            f"embedding {2 * int(self.spec.get('embedding_dim', 0))} floats)")

  def _check_size(self, size: Optional[int]) -> Optional[int]:
    if self._fixed_size is not None or self._exportable is None:
      if size not in (None, self._fixed_size):
        built = f"at {self._fixed_size} px" if self._fixed_size else "for high resolution"
        raise ModelError(f"size={size}: {self.path} was exported {built}; export it again with "
                         f"--size={size}")
      return None
    if size is None or int(size) == 0:
      return None
    if not 1 <= int(size) <= self.input_size:
      raise ModelError(f"size={size}: the degradation size must be in 1..{self.input_size} "
                       "(the model input), or None for high resolution")
    return int(size)

  def faces(self, images: Union[ImageLike, Sequence[ImageLike]]) -> np.ndarray:
    """(N, S, S, 3) uint8 from one image or a sequence of arrays / paths (checked)."""
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray)
                                                  and images.ndim in (2, 3)):
      images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
      return np.stack([as_face(x, self.input_size, f"images[{i}]")
                       for i, x in enumerate(images)]) if len(images) else images
    out = []
    for i, x in enumerate(images):
      if isinstance(x, (str, os.PathLike)):
        out.append(read_image(x, self.input_size))
      else:
        out.append(as_face(x, self.input_size, f"images[{i}]"))
    if not out:
      raise ModelError("no images given")
    return np.stack(out)

  def embed(self, images: Union[ImageLike, Sequence[ImageLike]], size: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """float32 embeddings concat(emb(x), emb(flip x)): (2D,) for one image, else (N, 2D).

    images: an RGB uint8 (S, S, 3) array or a file path, or a sequence / (N, S, S, 3) array
    of them. size: degrade as for a student evaluated at that LR size (None: as given).
    progress: called with the number of images done after each batch.
    """
    single = isinstance(images, (str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3))
    size = self._check_size(size)
    x = self.faces(images)
    b = self.batch_size
    out = []
    for i in range(0, len(x), b):
      chunk = x[i:i + b]
      n = len(chunk)
      if n < b:  # one compiled shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
      out.append(np.asarray(self._batch_fn(chunk, size, i), np.float32)[:n])
      if progress is not None:
        progress(n)
    e = np.concatenate(out) if out else np.zeros((0, 2 * self.spec["embedding_dim"]), np.float32)
    return e[0] if single else e

  @staticmethod
  def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis (broadcast): a (D,) or (N, D), b (D,) or (M, D)
    with N == M or one side single."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[-1] != b.shape[-1]:
      raise ModelError(f"similarity: embeddings of {a.shape[-1]} and {b.shape[-1]} floats; "
                       "compare embeddings of the same model")
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    s = np.sum((a / np.maximum(na, 1e-12)) * (b / np.maximum(nb, 1e-12)), axis=-1)
    return s if s.ndim else float(s)

  def threshold(self, size: Optional[int] = None, set_name: Optional[str] = None) -> Threshold:
    """The verification threshold stored with the model's evaluation at this resolution."""
    if self._fixed_size is not None and size is None:
      size = self._fixed_size
    key = "HR" if not size else str(int(size))
    ev = self.evaluation
    how = ("run `python -m askd_jax.main --config=CONFIG --evaluate="
           f"{self.eval_target}" + (f" --eval_sizes={size}" if size else "") + "` first "
           "(CONFIG: the config the model was trained with, e.g. configs/facerec.py)")
    if not ev:
      why = f": {self._no_evaluation}" if self._no_evaluation else ""
      raise ModelError(f"{self.path}: the model has no evaluation ({EVAL_FILE}{why}), so no "
                       f"verification threshold; {how}")
    if key not in ev:
      have = ", ".join(f"--size={k}" if k != "HR" else "no --size" for k in ev)
      raise ModelError(f"{self.path}: evaluated at {', '.join(ev)} but not at {key}; use {have}, "
                       f"or {how}")
    sets = {k: v for k, v in ev[key].items() if isinstance(v, dict)}
    if set_name is not None and set_name not in sets:
      raise ModelError(f"--set={set_name}: {self.path} was evaluated at {key} on "
                       f"{', '.join(sets) or 'no set'}")
    names = [set_name] if set_name else list(sets)
    for name in names:
      r = sets[name]
      if r.get("threshold") is not None:
        return Threshold(float(r["threshold"]), name, key, r.get("accuracy"))
    raise ModelError(f"{self.path}: its {EVAL_FILE} at {key} holds no verification threshold "
                     f"(written by an older askd_jax); delete {EVAL_FILE} and {how}")

  @property
  def eval_target(self) -> str:
    return self.spec.get("_source_dir", self.path)

  def export(self, size: Optional[int] = None, platforms: Sequence[str] = ("cpu",)):
    """A `jax.export.Exported` of the eval-mode embedder, parameters baked in: uint8
    (batch, S, S, 3) RGB -> float32 (batch, 2D), the batch dimension symbolic."""
    if self._exportable is None:
      raise ModelError(f"{self.path} is already an export")
    import jax
    fn = self._exportable(self._check_size(size))
    b, = jax.export.symbolic_shape("batch")
    arg = jax.ShapeDtypeStruct((b, self.input_size, self.input_size, 3), np.uint8)
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(arg)


# --- loading --------------------------------------------------------------------------------

def _default_cfg(input_size: int, workdir_cfg=None):
  """The config the task needs to build and evaluate the model; the run's own when found."""
  import ml_collections
  if workdir_cfg is not None:
    cfg = ml_collections.ConfigDict(workdir_cfg.to_dict())
  else:
    cfg = ml_collections.ConfigDict({
        "task": "facerec", "dtype": "float32", "data": {"image_size": input_size},
        "model": {"dropout": 0.0}, "eval": {"batch_size": 64},
        "student": {"mode": "official", "blur": "official", "sigma_range": (0.1, 2.0)}})
  cfg.data.image_size = input_size
  return cfg


def _workdir_config(stage_dir: str):
  """The config.json of the workdir a stage directory sits in, or None."""
  from askd_jax.evaluate.attention import load_config
  parent = os.path.dirname(stage_dir.rstrip(os.sep))
  if not os.path.exists(os.path.join(parent, "config.json")):
    return None
  try:
    return load_config(parent)
  except ValueError:
    return None


def _read_json(path: str) -> Dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ModelError(f"{path}: not valid JSON ({e}); delete it and evaluate again") from None


def _evaluation(path: str, variables, own_cfg, dtype: str, name: Optional[str]):
  """({resolution: {set: results}} of the model's evaluation, '' or why there is none):
  `name`'s, else the one under its training config `own_cfg` (None: unknown) in `dtype`;
  never one written for other weights."""
  from askd_jax import evalfile
  from askd_jax.experiment import eval_fingerprint
  doc = evalfile.read(os.path.join(path, evalfile.FILE), evalfile.weights_hash(variables))
  config = None if own_cfg is None else eval_fingerprint(own_cfg)
  entry, why = evalfile.select(doc, config, dtype, name)
  if entry is None and name:
    raise ModelError(f"evaluation={name}: {path}: {why}")
  return (entry["results"], "") if entry else ({}, why)


def _missing(path: str) -> ModelError:
  return ModelError(f"{path}: no such model; give a stage directory of a run (e.g. "
                    "workdir/facerec_demo/teacher), a directory written by `python -m "
                    "askd_jax.tools.convert`, or a .jaxexport or .onnx file written by "
                    "`python -m askd_jax.tools.export`")


def load(path: Union[str, os.PathLike], batch_size: int = 64,
         evaluation: Optional[str] = None) -> FaceModel:
  """A FaceModel from a training stage directory, a converted checkpoint directory, an
  exported .jaxexport file or an exported .onnx file (run by onnxruntime). `evaluation`:
  whose thresholds to use when eval.json holds several (an entry's key, its start, or a
  preset; default: the training config's). Errors
  (ModelError, one line) name the path and the fix."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isfile(path):
    if path.lower().endswith(".onnx"):
      return _load_onnx(path, batch_size)
    return _load_export(path, batch_size)
  if not os.path.isdir(path):
    raise _missing(path)
  from askd_jax.train.checkpoint import SPEC_FILE, load_model, read_spec
  if not os.path.exists(os.path.join(path, SPEC_FILE)):
    stages = sorted(d for d in os.listdir(path)
                    if os.path.exists(os.path.join(path, d, SPEC_FILE)))
    if stages:
      raise ModelError(f"{path} is a workdir, not a model; pick one of its stages: "
                       + ", ".join(os.path.join(path, s) for s in stages))
    raise _missing(path)
  spec = read_spec(path)
  if spec.get("task") != "facerec":
    raise ModelError(f"{path}: holds a {spec.get('task')!r} model ({SPEC_FILE}); faces are "
                     "embedded by a facerec model (a face-recognition run or a converted "
                     "official checkpoint)")
  try:
    variables, spec = load_model(path)
  except Exception as e:  # orbax / checkpoint errors come in many types
    raise ModelError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
  import jax
  import jax.numpy as jnp
  from askd_jax.tasks import get_task
  from askd_jax.experiment import eval_dtype
  own = _workdir_config(path)
  cfg = _default_cfg(int(spec["input_size"]), own)
  task = get_task(cfg)
  dtype = eval_dtype(cfg)
  model = task.model(dtype=jnp.dtype(dtype), spec=spec)
  fns: Dict[Optional[int], Callable] = {}
  key = jax.random.key(0)

  def embed_fn(size):
    if size not in fns:
      fns[size] = task.embed_fn(model, (size,) if size else (), cfg.student)
    return fns[size]

  def batch_fn(images, size, start):  # the per-batch key of FaceRecTask.embeddings
    return embed_fn(size)(variables, images, jax.random.fold_in(key, start))

  def exportable(size):
    fn = embed_fn(size)
    return lambda images: fn(variables, images, jax.random.key(0))

  def traceable(size, flip):
    """float32 (B, S, S, 3) in [-1, 1], in the network's own channel order (no reversal) ->
    concat(emb(D(x)), emb(D(flip x))) (flip) or emb(D(x)), D the degradation to `size` (if
    any): the embedding of embed_fn with the plain-op formulation (any platform but "cpu"
    selects it; askd_jax/ops), unjitted, for a converter to trace."""
    from askd_jax.data import degrade as degrade_lib
    from askd_jax.evaluate.verification import flip_concat_embed
    from askd_jax.train.loop import student_degrade_cfg
    net = task.model(dtype=jnp.float32, spec=dict(spec, channel_order="rgb"), platform="export")
    deg = None
    if size:
      d = degrade_lib.make_degrade(student_degrade_cfg(cfg.student, (size,)))
      deg = lambda x: d(x, jax.random.key(0))

    def embed(x):
      (out, _), _ = task.forward(net, variables, x, {}, train=False)
      return out["embedding"].astype(jnp.float32)
    if flip:
      return lambda x: flip_concat_embed(embed, x, deg)
    return lambda x: embed(x if deg is None else deg(x))

  from askd_jax.train.checkpoint import params_hash  # identifies the model of a gallery
  spec = dict(spec, params_hash=params_hash(variables["params"]), _source_dir=path)
  results, why = _evaluation(path, variables, own, dtype, evaluation)
  return FaceModel(path, spec, batch_fn, evaluation=results, batch_size=batch_size,
                   exportable=exportable, no_evaluation=why,
                   traceable=traceable)


def _load_export(path: str, batch_size: int) -> FaceModel:
  import jax
  with open(path, "rb") as f:
    data = f.read()
  try:
    exp = jax.export.deserialize(bytearray(data))
  except Exception as e:  # flatbuffer errors come in many types
    raise ModelError(f"{path}: not a model written by `python -m askd_jax.tools.export` "
                     f"({type(e).__name__}); give a model directory or a .jaxexport file") from None
  meta = _read_json(path + SIDECAR_SUFFIX)
  shape = exp.in_avals[0].shape
  spec = dict(meta.get("spec") or {"task": "facerec"})
  if spec.get("task", "facerec") != "facerec":
    raise ModelError(f"{path}: holds a {spec.get('task')!r} model; faces are embedded by a "
                     "facerec model")
  spec["input_size"] = int(shape[1])
  spec["embedding_dim"] = int(exp.out_avals[0].shape[-1]) // 2
  spec["_source_dir"] = meta.get("source", path)
  call = jax.jit(exp.call)
  return FaceModel(path, spec, lambda images, size, start: call(images),
                   evaluation=meta.get("evaluation"), fixed_size=meta.get("size") or None,
                   batch_size=batch_size)


def require_deploy(modules: Sequence[str], what: str) -> None:
  """ModelError naming the extras to install when one of `modules` does not import."""
  import importlib
  missing = []
  for m in modules:
    try:
      importlib.import_module(m)
    except ImportError:
      missing.append(m)
  if missing:
    raise ModelError(f"{what} needs {', '.join(missing)}, which is not installed; "
                     f"{DEPLOY_EXTRAS}")


def _load_onnx(path: str, batch_size: int) -> FaceModel:
  """A FaceModel running an exported .onnx file through onnxruntime (CPU). Its `embed` takes
  RGB uint8 crops as every FaceModel does: the channels are put in the file's order and
  normalised here, and a plain export is run on the image and its flip, so that the
  embeddings are flip_concat ones, as the evaluation and its threshold need."""
  require_deploy(("onnxruntime",), f"{path}: running an .onnx model")
  import onnxruntime as ort
  so = ort.SessionOptions()
  so.log_severity_level = 3  # errors only: not its notes on constants it leaves unfolded
  try:
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own exception types
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    raise ModelError(f"{path}: not an ONNX model onnxruntime can run ({type(e).__name__}: "
                     f"{msg}); give a file written by `python -m askd_jax.tools.export "
                     "--format=onnx`") from None
  meta = sess.get_modelmeta().custom_metadata_map
  if meta.get("format") != ONNX_FORMAT:
    raise ModelError(f"{path}: an ONNX model without askd_jax's metadata (format "
                     f"{meta.get('format')!r}); give a file written by `python -m "
                     "askd_jax.tools.export --format=onnx`")
  spec = dict(json.loads(meta["spec"]))
  bgr = meta["channel_order"] == "bgr"
  flip_concat = meta["embedding"] == "flip_concat"
  name = sess.get_inputs()[0].name
  dim = int(meta["embedding_size"])
  spec["input_size"] = int(meta["input_size"])
  spec["embedding_dim"] = dim // 2 if flip_concat else dim
  spec["_source_dir"] = meta.get("source", path)

  def run(images):  # uint8 (B, S, S, 3) RGB -> the file's output
    x = images[..., ::-1] if bgr else images
    x = ((x.astype(np.float32) - ONNX_MEAN) / ONNX_MEAN).transpose(0, 3, 1, 2)
    if flip_concat:
      return sess.run(None, {name: x})[0]
    both = sess.run(None, {name: np.concatenate([x, x[..., ::-1]])})[0]
    return np.concatenate([both[:len(x)], both[len(x):]], axis=-1)

  size = int(meta.get("degradation_size", "0")) or None
  return FaceModel(path, spec, lambda images, size, start: run(images),
                   evaluation=json.loads(meta.get("evaluation", "{}")), fixed_size=size,
                   batch_size=batch_size)


def export_metadata(model: FaceModel, size: Optional[int]) -> Dict[str, Any]:
  """What `load` reads back from model.jaxexport.json (the export itself holds only the
  computation): the spec, the built-in degradation size and the evaluation results."""
  import jax
  spec = {k: v for k, v in model.spec.items() if not k.startswith("_")}
  return {"format": EXPORT_FORMAT, "source": model.path, "spec": spec, "size": size or None,
          "input": f"uint8 (batch, {model.input_size}, {model.input_size}, 3) RGB",
          "output": f"float32 (batch, {2 * int(spec['embedding_dim'])}): "
                    "concat(emb(x), emb(flip x))",
          "evaluation": model.evaluation, "jax": jax.__version__}


# --- the command-line tools -----------------------------------------------------------------

def run_cli(prog: str, body: Callable[[], int]) -> int:
  """Run a tool's body; a user error becomes one line on stderr and exit code 1."""
  import logging
  import sys
  from askd_jax.tools.paths import OutputPathError
  from askd_jax.train.state_io import CheckpointError
  for name in ("absl", "orbax", "jax._src.xla_bridge"):  # orbax's notes on read-only loads
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    return body()
  except (ModelError, OutputPathError, CheckpointError, FileNotFoundError,
          FileExistsError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 1
