"""Train a teacher and its low-resolution students, evaluate them, write the report.

    python -m askd_jax.main --config=configs/facerec.py            # the demo, CPU, minutes
    python -m askd_jax.main --config=configs/facerec.py:casia --config.data.manual_dir=...
    python -m askd_jax.main --config=configs/facerec.py --evaluate=WORKDIR/student_askd_7px

Re-running the same command resumes: finished stages are skipped and an unfinished one
continues from its newest checkpoint. SIGTERM/SIGINT finish the step, checkpoint, exit 0.
Failures end with one `error: ...` line (exit 1 at run time, 2 for a usage error); the full
trace goes to WORKDIR/run.log, and to stderr with --verbose.

This file parses the flags, dispatches and maps failures to exit statuses; the work is
askd_jax.experiment's (`run`, `evaluate`), which notebooks and tests call in process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback

from askd_jax import stop

if __name__ == "__main__":  # honour Ctrl-C / SIGTERM from the first moment (imports take seconds)
  stop.install()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from askd_jax import experiment, failures  # noqa: E402
from askd_jax.failures import UsageError  # noqa: E402


sys.argv[1:] = experiment.last_value_per_field(sys.argv[1:])


def _fail(msg: str, code: int = 2) -> None:
  """A usage error: one line on stderr, no traceback."""
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def _config_arg() -> str:
  return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")),
              "configs/facerec.py")


def _no_config_file(reason: str) -> str:
  """The line for a --config file that cannot be read; a relative path is read from the
  current folder, which is named."""
  path = _config_arg().split(":", 1)[0]
  where = "" if os.path.isabs(path) else f" (relative to the current folder {os.getcwd()})"
  return (f"--config: {reason}{where}; give an existing config file, e.g. "
          "--config=configs/facerec.py")


def _flag_error(e: BaseException) -> str:
  """One line from a flag/config parsing error (ml_collections embeds the config file's
  traceback in its message: keep the flag and the exception's last line)."""
  missing = re.search(r"earlier failure to load.*?(\[Errno \d+\][^\n]*)", str(e), re.S)
  if missing:  # a --config.* override applied to a config file that could not be read
    return _no_config_file(missing.group(1).strip())
  if isinstance(e, (AttributeError, KeyError)):  # --config.a.b=v naming no field
    text = str(e).replace("\\", "")
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    arg = next((a for a in sys.argv[1:] if key and a.startswith("--config.")
                and a.split("=")[0].endswith("." + key.group(1))), "a --config.* override")
    return (f"{arg}: the config has no field {key.group(1) if key else text!r}"
            + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
            + "; see the config file for the fields")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if len(lines) > 1:
    head = lines[0].split(": Error whilst")[0].removeprefix("flag ")
    return f"{head}: {re.sub(r'^[A-Za-z]*Error: ', '', lines[-1])}"
  if isinstance(e, flags.IllegalFlagValueError):
    return f"{lines[0].removeprefix('flag ')}; give a value of the field's type"
  return lines[0] if lines else type(e).__name__


def _config_file_error(e: BaseException) -> str:
  """One line for a config file that does not load (syntax error, no get_config, raises)."""
  path = _config_arg()
  if isinstance(e, SyntaxError):
    where = f"line {e.lineno}: " if e.lineno else ""
    return (f"--config={path}: {where}{e.msg} (not a Python config file?); fix the file, which "
            "must define get_config(preset) returning a ConfigDict")
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return (f"--config={path}: the file defines no get_config(); define get_config(preset) "
            "returning a ml_collections.ConfigDict (see configs/facerec.py)")
  return (f"--config={path}: get_config() raised {type(e).__name__}: "
          f"{failures.first_line(e)}; fix the config file")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if "get_config" in str(e):
      _fail(_config_file_error(e))
    _fail(_flag_error(e))
  except (flags.Error, OSError) as e:
    _fail(_flag_error(e))
  except Exception as e:  # the config file itself: SyntaxError, get_config() raising
    _fail(_config_file_error(e))


try:  # ml_collections applies --config.* overrides already here, at definition
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/facerec.py",
                                            "Config file, optionally :PRESET.", lock_config=True)
except (flags.Error, OSError, AttributeError, KeyError) as _e:
  _fail(_config_file_error(_e) if "get_config" in str(_e) else _flag_error(_e))
except Exception as _e:  # pylint: disable=broad-except
  _fail(_config_file_error(_e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the report go "
                               "(default: ./workdir/<task>_<preset>).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds another "
                               "config's run (the old one is moved to WORKDIR.old-<time>).")
_EVALUATE = flags.DEFINE_string("evaluate", None, "Only evaluate this model directory (a stage "
                                "dir or a converted checkpoint) and print its accuracy.")
_SIZES = flags.DEFINE_string("eval_sizes", "", "With --evaluate: comma-separated LR sizes, "
                             "each evaluated on its own (empty: high resolution).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a failure, print the full traceback (it is "
                             "always written to WORKDIR/run.log).")


def main(argv):
  del argv
  cfg = _CONFIG.value
  try:
    cfg.get("task")  # ml_collections defers a missing config file's error to first use
  except OSError as e:
    _fail(_no_config_file(str(e).strip().splitlines()[-1].strip()))
  workdir = _WORKDIR.value or os.path.join("workdir", f"{cfg.task}_{cfg.get('preset', 'run')}")
  for h in logging.getLogger().handlers:  # the terminal: warnings and errors (INFO: run.log)
    if h.level == logging.NOTSET:
      h.setLevel(logging.WARNING)
  try:
    with stop.handling():
      experiment.setup(cfg)
      if _EVALUATE.value:
        _evaluate_only(cfg)
      elif _SIZES.value:
        raise UsageError(f"--eval_sizes={_SIZES.value} only applies with --evaluate=MODEL_DIR; "
                         "a training run evaluates each student at config.student.sizes")
      elif cfg.get("grid") is not None:  # splits x seeds, one report (configs/facerec.py:compare)
        from askd_jax.compare import run_grid
        run_grid(cfg, workdir, _OVERWRITE.value)
      else:
        experiment.run(cfg, workdir, overwrite=_OVERWRITE.value)
  except BaseException as e:  # the one place a failure becomes one line and an exit status
    _close_progress_bars()
    code, line = failures.describe_failure(e, cfg, workdir)
    if code is None:
      raise
    if code == 0:
      print(line)
      sys.exit(0)
    if code == 1 and failures.unexpected(e):  # experiment.run wrote the trace to run.log
      log_path = getattr(e, "run_log", None)
      line += (f" (full trace in {log_path})" if log_path
               else " (--verbose prints the full trace)")
    if _VERBOSE.value:
      print("".join(traceback.format_exception(e)), file=sys.stderr, end="")
    _fail(line, code)


def _evaluate_only(cfg) -> None:
  from askd_jax.train.checkpoint import check_model_dir, read_spec
  try:
    sizes = tuple(int(s) for s in _SIZES.value.split(",") if s.strip())
  except ValueError:
    raise UsageError(f"--eval_sizes={_SIZES.value}: give comma-separated integer sizes in px, "
                     "e.g. --eval_sizes=7,14 (empty: high resolution)") from None
  path = _EVALUATE.value
  try:
    check_model_dir(path, "--evaluate=")
    read_spec(path)
  except (FileNotFoundError, ValueError) as e:
    msg = str(e)
    raise UsageError(f"--evaluate={msg}" if msg.startswith(path) else msg) from None
  side = read_spec(path).get("input_size") or cfg.get("data", {}).get("image_size")
  bad = [s for s in sizes if not 1 <= s <= (side or s)]
  if bad:
    raise UsageError(f"--eval_sizes={_SIZES.value}: {bad[0]} px is outside [1, {side}], the "
                     f"input size of {path}; give sizes up to {side} (empty: high resolution)")
  print(json.dumps(experiment.evaluate(cfg, path, sizes), indent=2))


def _close_progress_bars() -> None:
  """End a progress bar left mid-line, so the message below starts a line of its own."""
  try:
    from tqdm import tqdm
  except ImportError:
    return
  for bar in list(getattr(tqdm, "_instances", ())):
    bar.close()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
