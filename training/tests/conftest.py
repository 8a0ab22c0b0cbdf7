"""Fixtures for the hpctrain tests: tiny data, an isolated in-process ``hpctrain`` runner, the stack.

``stack_env`` is the repository-wide fixture from tests/conftest.py (addresses and credentials of
the local stack started by ``make up``); integration tests here use it like the rest of the repo.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hpctrain_testing import ISOLATED_ENV, REPO


def _repo_conftest():
    spec = importlib.util.spec_from_file_location("_repo_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack_env = _repo_conftest().stack_env


@pytest.fixture(scope="session")
def borehole_csv(tmp_path_factory) -> Path:
    """512 rows of the borehole function as CSV."""
    from hpctrain.data.borehole import make_table

    path = tmp_path_factory.mktemp("data") / "borehole.csv"
    make_table(512, seed=1).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def borehole_parquet(tmp_path_factory) -> Path:
    """Another 512 rows (different seed) as Parquet: a held-out set."""
    from hpctrain.data.borehole import make_table

    path = tmp_path_factory.mktemp("data") / "heldout.parquet"
    make_table(512, seed=2).to_parquet(path, index=False)
    return path


@pytest.fixture
def clean_env(monkeypatch) -> pytest.MonkeyPatch:
    """No tracking server, no Slurm, no Mongo from the caller's environment."""
    for name in ISOLATED_ENV:
        monkeypatch.delenv(name, raising=False)
    # Set (and so restored after the test) because fit sets them process-wide.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.setenv("HPCTRAIN_JOB_DIR", os.getcwd())
    return monkeypatch


@pytest.fixture
def hpctrain(clean_env) -> Callable[..., int]:
    """Run the ``hpctrain`` command in this process and return its exit code.

    Runs in-process to pay torch/Lightning's import time once per test session.
    """
    from hpctrain.cli import main
    from hpctrain.signals import reset_process_latch

    def run(*args: str) -> int:
        try:
            return main([str(a) for a in args])
        except SystemExit as exc:  # jsonargparse exits on parse errors
            return int(exc.code or 0)
        finally:
            reset_process_latch()

    yield run
    reset_process_latch()
