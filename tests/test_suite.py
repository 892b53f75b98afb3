"""The suite's own set-up (tests/conftest.py)."""
from __future__ import annotations

import os
import pathlib

import conftest

HERE = pathlib.Path(__file__).resolve().parent


def test_long_first_names_existing_test_modules():
  """conftest.LONG_FIRST orders xdist's work by module name: a renamed or deleted module
  would silently drop out of the order (and its slow fixtures could start last)."""
  missing = [m for m in conftest.LONG_FIRST if not (HERE / m).is_file()]
  assert not missing, f"conftest.LONG_FIRST names no such test module: {missing}"
  assert len(set(conftest.LONG_FIRST)) == len(conftest.LONG_FIRST)


def test_the_session_compiles_with_the_test_flags_and_the_shared_run_with_the_defaults():
  """This process and its CLI subprocesses get TEST_XLA_FLAGS; production_env() removes them
  (the flags are XLA debug options: a typo would abort every JAX process at start)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if os.environ.get("ASKD_TEST_XLA_DEFAULTS") != "1":
    assert set(conftest.TEST_XLA_FLAGS.split()) <= set(flags)
  assert conftest.cli_env()["XLA_FLAGS"].split().count("--xla_cpu_use_fusion_emitters=false") <= 1
  prod = conftest.production_env(XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                                 + conftest.TEST_XLA_FLAGS)
  assert prod["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
