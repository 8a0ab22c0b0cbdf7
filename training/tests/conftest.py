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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> dict[str, str]:
    """A real ``redis-server`` (Debian's) on a free loopback port, with a password, for this session.

    Returns the job environment producers and trainer read: ``SLURMFLOW_STAGING_ADDRESS`` and
    ``SLURMFLOW_STAGING_PASSWORD_FILE`` (a mode-600 file, as the job's secrets would be).
    """
    import secrets
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    root = tmp_path_factory.mktemp("redis")
    password = secrets.token_hex(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port != 6380  # the stack's port
    config = root / "redis.conf"
    config.write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {root}\nsave \"\"\n"
                      "appendonly no\nprotected-mode yes\n")
    config.chmod(0o600)
    secret = root / "staging.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    proc = subprocess.Popen([binary, str(config)], stdout=open(root / "redis.log", "w"), stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not start: {(root / 'redis.log').read_text()}") from None
            time.sleep(0.05)
    yield {"SLURMFLOW_STAGING_ADDRESS": f"127.0.0.1:{port}", "SLURMFLOW_STAGING_PASSWORD_FILE": str(secret)}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def staging_env(redis_server, monkeypatch, request) -> dict[str, str]:
    """The store's environment for one test, under a namespace of its own (set in this process too)."""
    import re

    namespace = "t-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60]
    env = {**redis_server, "SLURMFLOW_STAGING_NAMESPACE": namespace}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from hpctrain.staging import StagingStore, StoreAddress

    store = StagingStore.connect(StoreAddress.from_env(), namespace, wait_s=5)
    for key in store.client.scan_iter(match=f"{namespace}:*"):
        store.client.delete(key)
    return env
