"""Rehearse a paper preset end to end on a small data set in the real file formats.

    python -m askd_jax.tools.rehearse --preset=casia --out=/tmp/rehearse_casia
    python -m askd_jax.tools.rehearse --preset=imagenet --out=DIR --steps=200 --batch=128 \\
        --dtype=bfloat16                                   # the paper-scale check on a GPU
    python -m askd_jax.tools.rehearse --preset=widerface --out=DIR --quick --small
                                                           # minutes on 2 CPU cores (the tests')

1. writes a few images in the formats the data sets are distributed in (casia: insightface
   train.rec/.idx with its header record and CASIA's 10,572 identities, lfw.bin /
   agedb_30.bin / cfp_fp.bin, a TinyFace folder; imagenet: ILSVRC2012_img_{train,val}.tar;
   widerface: WIDER_train/WIDER_val images, wider_face_split txt, eval_tools .mat);
2. prepares them with `python -m askd_jax.data.prepare`;
3. runs the preset's own command, `python -m askd_jax.main --config=configs/<task>.py:<preset>
   --config.data.manual_dir=... --config.data.data_dir=...`, with run-length overrides only
   (steps, batch, checkpoint/log interval, eval batch, loader workers capped at the CPU count,
   one A-SKD student: all three sizes for casia, the first factor for imagenet/widerface);
   the full-size model, sizes, loss weights, dtype and evaluation are the preset's;
   --quick trains one student (casia: 14 px) and evaluates the teacher at HR only;
   --small adds the model-size overrides of SMALL (one block per stage, fewer channels);
4. SIGKILLs the process group once the first A-SKD student has written a checkpoint, re-runs
   the same command (which resumes it and finishes every stage), and with --verify_resume
   trains that student once more uninterrupted (a hard-linked copy of the workdir without
   the student) and checks that both end with bit-identical parameters (not with --quick);
5. prints one table per stage from STAGE/events.jsonl (written by the train loop and the
   evaluation): steps, end-to-end img/s, compile time, peak RSS, checkpoint size / save time,
   evaluation time per set. Also written to OUT/rehearsal.md and OUT/rehearsal.json.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = {  # preset -> (config file, datasets to prepare, overrides beyond the common ones)
    "casia": ("facerec.py", "casia,lfw,agedb_30,cfp_fp,tinyface", []),
    "imagenet": ("imagenet.py", "imagenet", ["--config.student.factors=2,"]),
    "widerface": ("widerface.py", "widerface", ["--config.student.factors=16,"]),
}
QUICK = {  # --quick: the first A-SKD student only; the teacher evaluated at HR only
    "casia": ["--config.student.sizes=14,", "--config.student.eval_teacher_lr=False"],
    "imagenet": ["--config.student.eval_teacher_lr=False"],
    "widerface": ["--config.student.eval_teacher_lr=False"],
}
SMALL = {  # --small: the preset's network with one block per stage and fewer channels
    "casia": ["--config.model.stage_sizes=1,1,1,1", "--config.model.width=0.25",
              "--config.model.embedding_dim=64"],
    "imagenet": ["--config.model.stage_sizes=1,1,1,1", "--config.model.width=16"],
    "widerface": ["--config.model.stage_sizes=1,1,1,1", "--config.model.width=32",  # GroupNorm(32)
                  "--config.model.fpn_channels=128", "--config.model.stacked_convs=1"],
}
# CASIA-WebFace's 10,572 identities (labels 0..10571, as prepare requires), so the ArcFace
# head has CASIA's rows: the first 4 with 16 images each, the others with one flat image.
CASIA_IDENTITIES, CASIA_TRAINED = 10572, 4


class RehearsalError(RuntimeError):
  pass


# --------------------------------------------------------------------------- data sets

def write_casia(manual: str) -> None:
  from askd_jax.data import fixtures
  from askd_jax.data.recordio import write_insightface_rec
  images = [(fixtures.encode_image(fixtures.identity_pixels(k, i), "JPEG"), k)
            for i in range(16) for k in range(CASIA_TRAINED)]
  flat = fixtures.encode_image(np.full((112, 112, 3), 128, np.uint8), "JPEG")
  images += [(flat, k) for k in range(CASIA_TRAINED, CASIA_IDENTITIES)]  # one image each
  write_insightface_rec(os.path.join(manual, "train.rec"), os.path.join(manual, "train.idx"),
                        images)
  for j, name in enumerate(("lfw", "agedb_30", "cfp_fp")):
    pix, issame = [], []
    for i in range(10):  # 10 pairs: one per fold
      a, same = i % CASIA_TRAINED, i % 2 == 0
      b = a if same else (a + 1) % CASIA_TRAINED
      pix += [fixtures.identity_pixels(a, 1000 * j + 2 * i),
              fixtures.identity_pixels(b, 1000 * j + 2 * i + 1)]
      issame.append(same)
    fixtures.write_verification_bin(os.path.join(manual, f"{name}.bin"), pix, issame, "JPEG")
  n = sum(len(v) for v in fixtures.TINYFACE_LAYOUT.values())
  fixtures.write_tinyface_tree(os.path.join(manual, "tinyface"),
                               fixtures.random_pixels(n, 7, size=24))


def write_imagenet(manual: str) -> None:
  from askd_jax.data import fixtures
  fixtures.write_fake_imagenet(manual, train_classes=(0, 7, 999), per_class=4,
                               val_numbers=(3, 1, 4, 2), train_hw=(300, 400), val_hw=(375, 500))


def write_widerface(manual: str) -> None:
  from askd_jax.data import fixtures

  def faces(i, n):  # x y w h blur expression illumination invalid occlusion pose
    return [[60 + 150 * k + 10 * i, 80 + 20 * i, 40 + 12 * k, 48 + 12 * k, k % 3, 0, 0, 0,
             k % 3, 0] for k in range(n)]
  train = {"0--Parade": {f"0_Parade_t{i}": faces(i, 2 + i % 3) for i in range(4)},
           "1--Handshaking": {f"1_Handshaking_t{i}": faces(i, 1 + i % 2) for i in range(4)}}
  val = {"0--Parade": {"0_Parade_v0": faces(0, 3)},
         "1--Handshaking": {"1_Handshaking_v1": faces(1, 2)}}
  keep = {"easy": {"0_Parade_v0": [1], "1_Handshaking_v1": [1]},
          "medium": {"0_Parade_v0": [1, 2], "1_Handshaking_v1": [1]},
          "hard": {"0_Parade_v0": [1, 2, 3], "1_Handshaking_v1": [1, 2]}}
  sizes = {n: (1024, 683 + 40 * (i % 3)) for i, n in
           enumerate(n for s in (train, val) for imgs in s.values() for n in imgs)}
  fixtures.write_tree(manual, fixtures.widerface_release_files(train, val, keep, sizes))


WRITERS = {"casia": write_casia, "imagenet": write_imagenet, "widerface": write_widerface}


# ----------------------------------------------------------------------------- running

def _run_logged(cmd: List[str], log_path: str, kill_when=None, timeout: float = 0
                ) -> Dict[str, Any]:
  """Run cmd in its own process group (output to log_path); SIGKILL the group when
  kill_when() turns true. Returns rc, wall seconds, the process's peak RSS, killed."""
  t0 = time.time()
  with open(log_path, "w") as log:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    killed = False
    while True:
      pid, status, ru = os.wait4(p.pid, os.WNOHANG)
      if pid:
        break
      if kill_when is not None and not killed and kill_when():
        os.killpg(p.pid, signal.SIGKILL)  # the node dies: the loader's workers go too
        killed = True
      if timeout and time.time() - t0 > timeout:
        os.killpg(p.pid, signal.SIGKILL)
        raise RehearsalError(f"{' '.join(cmd[:4])}... ran past {timeout:.0f} s; see {log_path}")
      time.sleep(0.05)
  p.returncode = os.waitstatus_to_exitcode(status)
  try:  # the loader's workers of a killed run (same group) must not outlive it
    os.killpg(p.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  return {"rc": p.returncode, "seconds": time.time() - t0, "max_rss_bytes": ru.ru_maxrss * 1024,
          "killed": killed, "log": log_path}


def _tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _events(stage_dir: str) -> List[Dict[str, Any]]:
  path = os.path.join(stage_dir, "events.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _saved(stage_dir: str) -> bool:
  return any(e["event"] == "save" for e in _events(stage_dir))


def _du(path: str) -> int:
  total = 0
  for d, _, files in os.walk(path):
    for f in files:
      try:
        total += os.lstat(os.path.join(d, f)).st_size
      except OSError:
        pass
  return total


def stage_names(workdir: str) -> List[str]:
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)["config"]
  return ["teacher"] + [f"student_{m}_{s}px" for s in cfg["student"]["sizes"]
                        for m in cfg["student"]["methods"]]


def main_command(preset: str, out: str, workdir: str, steps: int, batch: int,
                 eval_batch: int, dtype: Optional[str], jax_cache_dir: str,
                 quick: bool = False, small: bool = False) -> List[str]:
  """The preset's own command with run-length overrides only (and with small=True the
  model-size overrides of SMALL)."""
  config, _, extra = PRESETS[preset]
  cmd = [sys.executable, "-m", "askd_jax.main",
         f"--config={os.path.join(ROOT, 'configs', config)}:{preset}", f"--workdir={workdir}",
         f"--config.data.manual_dir={os.path.join(out, 'manual')}",
         f"--config.data.data_dir={os.path.join(out, 'tfds')}",
         f"--config.train.steps={steps}", f"--config.train.batch_size={batch}",
         "--config.train.checkpoint_every=1", "--config.train.log_every=1",
         "--config.student.methods=askd,", f"--config.eval.batch_size={eval_batch}",
         f"--config.jax_cache_dir={jax_cache_dir}", *extra]
  if preset in ("imagenet", "widerface"):  # the preset's worker count, capped at the cores
    from askd_jax.experiment import load_config
    preset_cfg = load_config(f"{os.path.join(ROOT, 'configs', config)}:{preset}")
    workers = min(int(preset_cfg.data.workers), os.cpu_count() or 1)
    cmd.append(f"--config.data.workers={workers}")
  if dtype:
    cmd.append(f"--config.dtype={dtype}")
  return cmd + (QUICK[preset] if quick else []) + (SMALL[preset] if small else [])


def load_final_variables(stage_dir: str):
  from askd_jax.train.checkpoint import load_model
  variables, _ = load_model(stage_dir)
  return variables


def compare_variables(a, b) -> List[str]:
  """Paths of the leaves that differ (shape, dtype or any bit)."""
  import jax
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  bad = [jax.tree_util.keystr(k) for k in sorted(set(fa) | set(fb), key=str)
         if k not in fa or k not in fb or np.asarray(fa[k]).shape != np.asarray(fb[k]).shape
         or np.asarray(fa[k]).tobytes() != np.asarray(fb[k]).tobytes()]
  return bad


def rehearse(preset: str, out: str, steps: int = 2, batch: int = 2, eval_batch: int = 2,
             dtype: Optional[str] = None, verify_resume: bool = True,
             timeout: float = 0, jax_cache_dir: Optional[str] = None, quick: bool = False,
             small: bool = False) -> Dict[str, Any]:
  if preset not in PRESETS:
    raise RehearsalError(f"--preset={preset}: use one of {sorted(PRESETS)}")
  if steps < 2:
    raise RehearsalError(f"--steps={steps}: the student is killed after a checkpoint and "
                         "resumed, so it needs at least 2 steps")
  verify_resume = verify_resume and not quick
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, "workdir")):
    raise RehearsalError(f"{out} holds an earlier rehearsal; give a new --out")
  manual, tfds_dir, workdir = (os.path.join(out, d) for d in ("manual", "tfds", "workdir"))
  os.makedirs(manual, exist_ok=True)
  report: Dict[str, Any] = {"preset": preset, "steps": steps, "batch": batch,
                            "eval_batch": eval_batch, "dtype": dtype, "quick": quick,
                            "small": small, "runs": {}}
  t = time.time()
  WRITERS[preset](manual)
  report["write_seconds"] = time.time() - t

  datasets = PRESETS[preset][1]
  prep = _run_logged([sys.executable, "-m", "askd_jax.data.prepare", f"--dataset={datasets}",
                      f"--manual_dir={manual}", f"--data_dir={tfds_dir}"],
                     os.path.join(out, "prepare.log"), timeout=timeout)
  if prep["rc"]:
    raise RehearsalError(f"prepare failed (rc {prep['rc']}): {_tail(prep['log'])}")
  report["runs"]["prepare"] = prep

  cmd = main_command(preset, out, workdir, steps, batch, eval_batch, dtype,
                     jax_cache_dir or os.path.join(out, "xla_cache"), quick, small)
  report["command"] = " ".join(cmd[2:])
  victim = None

  def victim_saved():
    nonlocal victim
    if victim is None and os.path.exists(os.path.join(workdir, "config.json")):
      victim = next(s for s in stage_names(workdir) if s.startswith("student_askd_"))
    return victim is not None and _saved(os.path.join(workdir, victim))

  first = _run_logged(cmd, os.path.join(out, "run1_killed.log"), kill_when=victim_saved,
                      timeout=timeout)
  report["runs"]["first (SIGKILL)"] = first
  if not first["killed"]:
    raise RehearsalError(f"the run ended (rc {first['rc']}) before student {victim} wrote a "
                         f"checkpoint: {_tail(first['log'])}")
  vdir = os.path.join(workdir, victim)
  if os.path.exists(os.path.join(vdir, "DONE")):
    raise RehearsalError(f"{victim} finished before the kill landed; use more --steps")
  killed_at = max(e["step"] for e in _events(vdir) if e["event"] == "save")
  report["killed"] = {"stage": victim, "after_checkpoint": killed_at}

  second = _run_logged(cmd, os.path.join(out, "run2_resumed.log"), timeout=timeout)
  report["runs"]["resumed"] = second
  if second["rc"]:
    raise RehearsalError(f"the resumed run failed (rc {second['rc']}): {_tail(second['log'])}")
  with open(os.path.join(workdir, "results.json")) as f:
    report["results"] = json.load(f)["rows"]
  with open(os.path.join(vdir, "model.json")) as f:
    spec = json.load(f)
  report["killed"].update(resumed_from=spec.get("resumed_from"),
                          trained_steps=spec.get("trained_steps"))
  if preset == "casia":  # TinyFace: the tinyface preset's own evaluation of this teacher
    tiny = [a.replace(":casia", ":tinyface") for a in cmd if not a.startswith("--config.train.")
            and not a.startswith("--config.student.") and not a.startswith("--workdir=")]
    run = _run_logged(tiny + [f"--evaluate={os.path.join(workdir, 'teacher')}",
                              "--eval_sizes=24"], os.path.join(out, "tinyface_eval.log"),
                      timeout=timeout)
    report["runs"]["tinyface evaluation"] = run
    if run["rc"]:
      raise RehearsalError(f"the TinyFace evaluation failed (rc {run['rc']}): {_tail(run['log'])}")
    from askd_jax import evalfile
    entry, why = evalfile.select(evalfile.read(os.path.join(workdir, "teacher", evalfile.FILE)),
                                 name="tinyface")
    if entry is None or "24" not in entry["results"]:
      raise RehearsalError(f"the TinyFace evaluation left no results at 24 px: {why}")
    report["tinyface"] = entry["results"]["24"]

  if verify_resume:
    ref = os.path.join(out, "reference")
    shutil.copytree(workdir, ref, copy_function=lambda s, d: (  # checkpoints: hard links
                        os.link(s, d) if f"{os.sep}checkpoints{os.sep}" in s else shutil.copy2(s, d)),
                    ignore=lambda d, names: [victim] if os.path.samefile(d, workdir) else [])
    for name in ("results.json", "results.md", "results.png"):
      if os.path.exists(os.path.join(ref, name)):
        os.remove(os.path.join(ref, name))
    third = _run_logged([a if not a.startswith("--workdir=") else f"--workdir={ref}"
                         for a in cmd], os.path.join(out, "run3_reference.log"), timeout=timeout)
    report["runs"]["reference (uninterrupted)"] = third
    if third["rc"]:
      raise RehearsalError(f"the reference run failed (rc {third['rc']}): {_tail(third['log'])}")
    bad = compare_variables(load_final_variables(vdir),
                            load_final_variables(os.path.join(ref, victim)))
    report["resume_identical"] = not bad
    report["resume_differs"] = bad[:20]
  report["stages"] = stage_tables(workdir, os.path.join(out, "reference") if verify_resume
                                  else None, victim)
  with open(os.path.join(out, "rehearsal.json"), "w") as f:
    json.dump(report, f, indent=2, default=str)
  md = format_report(report)
  with open(os.path.join(out, "rehearsal.md"), "w") as f:
    f.write(md)
  return report


# ------------------------------------------------------------------------------ tables

def _segments(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One segment per process that trained the stage (a compile event starts one); the
  evaluation events go to the last."""
  segs: List[Dict[str, Any]] = []
  for e in events:
    if e["event"] == "compile" or not segs:
      segs.append({"compile": None, "saves": [], "end": None, "evals": []})
    s = segs[-1]
    if e["event"] == "compile":
      s["compile"] = e
    elif e["event"] == "save":
      s["saves"].append(e)
    elif e["event"] == "end":
      s["end"] = e
    elif e["event"] == "eval":
      s["evals"].append(e)
  return segs


def stage_tables(workdir: str, ref: Optional[str], victim: Optional[str]) -> Dict[str, Any]:
  out = {}
  for name in stage_names(workdir):
    sdir = os.path.join(workdir, name)
    segs = _segments(_events(sdir))
    labels = (["first (SIGKILL)", "resumed"] if name == victim and len(segs) > 1 else
              ["first" if name == "teacher" or name == victim else "resumed run"] * len(segs))
    rows = [dict(seg, run=label) for seg, label in zip(segs, labels)]
    if ref and name == victim:
      rows += [dict(seg, run="reference (uninterrupted)")
               for seg in _segments(_events(os.path.join(ref, name)))]
    ck = os.path.join(sdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit()) if os.path.isdir(ck) else []
    out[name] = {"rows": rows, "checkpoint_bytes": _du(os.path.join(ck, str(steps[-1])))
                 if steps else None}
  return out


def _fmt(x, spec=".1f", none="-"):
  return none if x is None else format(x, spec)


def format_report(report: Dict[str, Any]) -> str:
  mode = "".join(f", {k}" for k in ("quick", "small") if report.get(k))
  lines = [f"# rehearsal of preset {report['preset']}: {report['steps']} steps per stage, "
           f"batch {report['batch']}, eval batch {report['eval_batch']}{mode}", "",
           f"    python -m {report['command']}", ""]
  for name, st in report["stages"].items():
    ck = st["checkpoint_bytes"]
    lines += [f"## {name}  (checkpoint {_fmt(ck and ck / 2**20)} MiB)", "",
              "| run | steps | img/s end to end | compile s | peak RSS GiB | save s | eval s per set |",
              "|---|---|---|---|---|---|---|"]
    for r in st["rows"]:
      end, comp = r["end"], r["compile"]
      steps = end["steps_run"] if end else (max((s["step"] for s in r["saves"]), default=None))
      ips = (end["timed_steps"] * end["batch_size"] / end["timed_seconds"]
             if end and end["timed_steps"] and end["timed_seconds"] > 0 else None)
      saves = [s["seconds"] for s in r["saves"]]
      evals = "; ".join(  # tasks without per-set times: the sets share one pass
          f"{e['resolution']}: " + (", ".join(f"{k} {_fmt(v)}" for k, v in e["sets"].items())
                                    if all(v is not None for v in e["sets"].values()) else
                                    "/".join(e["sets"])) + f" (all {_fmt(e['seconds'])})"
          for e in r["evals"]) or "cached"
      lines.append(f"| {r['run']} | {_fmt(steps, 'd') if steps is not None else '-'} | "
                   f"{_fmt(ips, '.2f')} | {_fmt(comp and comp['seconds'])} | "
                   f"{_fmt(end and end['max_rss_bytes'] / 2**30, '.2f')} | "
                   f"{_fmt(saves and sum(saves) / len(saves), '.2f')} x{len(saves)} | {evals} |")
    lines.append("")
  lines += ["| process | rc | wall s | peak RSS GiB |", "|---|---|---|---|"]
  for name, r in report["runs"].items():
    lines.append(f"| {name} | {r['rc']} | {r['seconds']:.0f} | {r['max_rss_bytes'] / 2**30:.2f} |")
  lines.append("")
  k = report.get("killed")
  if k and "resume_identical" not in report:
    lines.append(f"SIGKILL after {k['stage']}'s checkpoint at step {k['after_checkpoint']}; "
                 f"resumed from step {k.get('resumed_from')}, trained to step "
                 f"{k.get('trained_steps')} (no uninterrupted reference)")
  if "resume_identical" in report:
    lines.append(f"SIGKILL after {k['stage']}'s checkpoint at step {k['after_checkpoint']}; "
                 "resumed parameters "
                 + ("bit-identical to the uninterrupted reference" if report["resume_identical"]
                    else f"DIFFER from the uninterrupted reference: {report['resume_differs']}"))
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- CLI

_PRESET = flags.DEFINE_enum("preset", None, sorted(PRESETS), "The paper preset to rehearse.")
_OUT = flags.DEFINE_string("out", None, "A new folder for the data, the runs and the tables.")
_STEPS = flags.DEFINE_integer("steps", 2, "Training steps per stage (>= 2).")
_BATCH = flags.DEFINE_integer("batch", 2, "config.train.batch_size.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 2, "config.eval.batch_size.")
_DTYPE = flags.DEFINE_string("dtype", None, "config.dtype (default: the preset's).")
_VERIFY = flags.DEFINE_bool("verify_resume", True, "Train the killed student once more "
                            "uninterrupted and require bit-identical parameters.")
_QUICK = flags.DEFINE_bool("quick", False, "One A-SKD student (casia: 14 px only), the teacher "
                           "evaluated at HR only, no uninterrupted reference (implies "
                           "--noverify_resume): the SIGKILL and resume still run.")
_SMALL = flags.DEFINE_bool("small", False, "Model-size overrides (SMALL: one block per stage, "
                           "fewer channels); input sizes, data, heads and evaluation stay the "
                           "preset's.")
_TIMEOUT = flags.DEFINE_float("timeout", 0, "Seconds per process (0: none).")
_CACHE = flags.DEFINE_string("jax_cache_dir", None, "config.jax_cache_dir (default OUT/xla_cache: "
                             "cold compiles, measured; a kept folder makes re-runs warm).")


def main(argv):
  del argv
  if not _PRESET.value or not _OUT.value:
    raise app.UsageError("--preset and --out are required")
  import logging  # orbax logs every restore at INFO in this process (load_model)
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    report = rehearse(_PRESET.value, _OUT.value, _STEPS.value, _BATCH.value, _EVAL_BATCH.value,
                      _DTYPE.value, _VERIFY.value, _TIMEOUT.value,
                      _CACHE.value, _QUICK.value, _SMALL.value)
  except RehearsalError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(format_report(report))
  if report.get("resume_identical") is False:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
