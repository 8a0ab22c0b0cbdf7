"""``hpctrain store``: the job's staging store step, with Debian's real redis-server."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hpctrain_testing import spawn

from hpctrain.staging import StagingStore, StoreAddress, StoreUnavailable
from hpctrain.store import ADDRESS_FILE, config_text

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="Debian's redis-server is not installed")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the store published no address"
        time.sleep(0.05)
    return path.read_text().strip()


def test_store_serves_with_the_password_only_until_told_to_stop(tmp_path):
    password = secrets.token_urlsafe(24)
    staging = tmp_path / "staging"
    proc = spawn(["store", "--dir", staging], env={"SLURMFLOW_STAGING_PASSWORD": password,
                                                     "SLURMD_NODENAME": "localhost"})
    try:
        address = _wait_for(staging / ADDRESS_FILE, proc)
        host, port = address.rsplit(":", 1)
        assert host == "localhost"
        store = StagingStore.connect(StoreAddress(host, int(port), password), wait_s=5)
        assert store.client.ping()
        with pytest.raises(StoreUnavailable, match="password"):
            StagingStore.connect(StoreAddress(host, int(port), "wrong"), wait_s=5)
        # the password left the disk once the server read it, and never was on a command line
        assert [p.name for p in staging.iterdir()] == [ADDRESS_FILE]
        assert oct(staging.stat().st_mode & 0o777) == "0o700"
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in ps
        proc.send_signal(signal.SIGUSR2)  # the trainer's preemption signal: the store keeps serving
        time.sleep(0.5)
        assert proc.poll() is None and store.client.ping()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        assert proc.returncode == 0, out
        with pytest.raises(StoreUnavailable):
            StagingStore.connect(StoreAddress(host, int(port), password), wait_s=1, poll_s=0.2)
    finally:
        proc.kill()


def test_a_store_that_cannot_start_fails_fast_with_the_reason(tmp_path):
    env = {"SLURMFLOW_STAGING_PASSWORD": "x" * 20, "SLURMD_NODENAME": "localhost"}
    missing = spawn(["store", "--dir", tmp_path / "a", "--redis-server", "no-such-redis-server"], env=env)
    out = missing.communicate(timeout=30)[0]
    assert missing.returncode == 1 and "no-such-redis-server is not installed" in out
    # a server that exits at once (here: a bad maxmemory) is reported within the start timeout, not after it
    started = time.monotonic()
    broken = spawn(["store", "--dir", tmp_path / "b", "--max-memory", "lots", "--start-timeout-s", "30"], env=env)
    out = broken.communicate(timeout=60)[0]
    assert broken.returncode == 1 and "did not come up" in out and "exited before it answered" in out
    assert time.monotonic() - started < 25
    assert not (tmp_path / "b" / ADDRESS_FILE).exists()
    no_password = spawn(["store", "--dir", tmp_path / "c"], env={"SLURMD_NODENAME": "localhost"})
    assert no_password.wait(30) == 2


def test_config_quotes_the_password_and_never_evicts(tmp_path):
    text = config_text("10.0.0.1", 7000, 'a"b\\c', tmp_path, "1gb")
    assert 'requirepass "a\\"b\\\\c"' in text
    assert "maxmemory-policy noeviction" in text and 'save ""' in text and "appendonly no" in text
    with pytest.raises(ValueError, match="line break"):
        config_text("10.0.0.1", 7000, "a\nport 1", tmp_path, None)
