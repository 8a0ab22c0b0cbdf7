"""SlurmHook against the real login node and Slurm: submit, query, logs, cancel, bad input."""

from __future__ import annotations

import time
import uuid

import pytest

from slurmflow.errors import SlurmConnectionError, SlurmSubmitError
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.identity import JobKey
from slurmflow.logs import LogRead
from slurmflow.sbatch import build_script, render_script
from slurmflow.states import SlurmState
from tests.integration import test_slurm_fixtures as live
from tests.integration.test_slurm_fixtures import ssh, wait_state

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn  # the fixture, shared by the Slurm integration modules


def script_for(hook, key, command, **options):
    script = build_script(
        command=command,
        job_name=key.job_name(0),
        job_dir=key.job_dir(hook.job_root, 0),
        options={"account": "research", "time": "5", **options},
    )
    return script, render_script(script)


def test_submit_query_logs_and_cancel(slurm_conn, stack_env):
    hook = SlurmHook()
    key = JobKey("it_hook", uuid.uuid4().hex, "basic")
    script, text = script_for(hook, key, "echo started; sleep 120")
    outcome = hook.submit(key, 0, script, text)
    assert outcome.action == "submitted"
    job_id = outcome.job_id
    wait_state(stack_env, job_id, {"RUNNING"})
    snap = hook.get_states([job_id])[job_id]
    assert snap.state.state is SlurmState.RUNNING and snap.name == key.job_name(0)
    log_path = f"{script.job_dir}/slurm-{job_id}.out"
    deadline = time.monotonic() + 20
    while b"started" not in hook.tail(log_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    chunk = hook.read_logs([LogRead(log_path, 0)])[0]
    assert b"[slurmflow] job" in chunk.data and b"started" in chunk.data
    hook.cancel([job_id])
    wait_state(stack_env, job_id, {"CANCELLED"})
    snap = hook.get_states([job_id])[job_id]
    assert snap.state.state is SlurmState.CANCELLED
    # The job directory is private; the script is not world-readable.
    out = ssh(stack_env, f"stat -c '%a' {script.job_dir} {script.script_path}")
    assert out.stdout.split() == ["700", "700"]


def test_scontrol_answers_when_accounting_is_off(slurm_conn, stack_env):
    hook = SlurmHook()
    out = ssh(stack_env, "sbatch --parsable -A research --output=/dev/null --wrap 'exit 4'")
    job_id = out.stdout.strip()
    wait_state(stack_env, job_id, {"FAILED"})
    hook.accounting = False  # as if sacct had said "accounting storage is disabled"
    snap = hook.get_states([job_id])[job_id]
    assert snap.source == "scontrol" and snap.state.state is SlurmState.FAILED and snap.state.exit_code == 4
    assert hook.command_counts["sacct"] == 0


@pytest.mark.parametrize(
    ("options", "cause"),
    [({"partition": "nosuch"}, "Invalid partition"), ({"account": "nosuch"}, "Invalid account")],
)
def test_rejected_sbatch_names_the_cause(slurm_conn, options, cause):
    hook = SlurmHook()
    key = JobKey("it_hook", uuid.uuid4().hex, "rejected")
    script, text = script_for(hook, key, "true", **options)
    with pytest.raises(SlurmSubmitError, match=cause):
        hook.submit(key, 0, script, text)
    # and pre-flight says the same without submitting
    hook.stage(script, text, None)
    with pytest.raises(SlurmSubmitError, match="(?i)invalid"):
        hook.test_only(script.script_path)


def test_preflight_accepts_a_good_job(slurm_conn):
    hook = SlurmHook()
    key = JobKey("it_hook", uuid.uuid4().hex, "preflight")
    script, text = script_for(hook, key, "true")
    hook.stage(script, text, None)
    assert "to start at" in hook.test_only(script.script_path)
    assert hook.find_jobs(key, 0) == {}, "test-only submits nothing"


def test_unreachable_host_without_patience_fails_fast_with_the_address(stack_env, monkeypatch):
    """``connect_patience`` (default 150 s) waits out an outage; with none the error is at once."""
    import json

    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps(
        {"conn_type": "ssh", "host": "127.0.0.1", "port": 1, "login": "hpcuser",
         "extra": {"key_file": stack_env["SSH_KEY"], "no_host_key_check": True, "conn_timeout": 3}}))
    hook = SlurmHook(conn_retry_attempts=1, connect_patience=0)
    started = time.monotonic()
    with pytest.raises(SlurmConnectionError, match=r"hpcuser@127\.0\.0\.1:1"):
        hook.get_states(["1"])
    assert time.monotonic() - started < 15


def test_vanished_job_id_is_unknown(slurm_conn):
    snap = SlurmHook().get_states(["987654"])["987654"]
    assert snap.state.state is SlurmState.UNKNOWN


def test_secrets_file_is_mode_600_and_outside_the_script(slurm_conn, stack_env):
    from slurmflow.secrets import JobSecrets

    hook = SlurmHook()
    key = JobKey("it_hook", uuid.uuid4().hex, "secrets")
    secrets = JobSecrets({"TOKEN": "s3cr3t-xyz"})
    script = build_script(command="true", job_name=key.job_name(0), job_dir=key.job_dir(hook.job_root, 0),
                          options={"account": "research"}, secret_names=secrets.names)
    text = render_script(script)
    hook.stage(script, text, secrets.file_text())
    out = ssh(stack_env, f"stat -c '%a' {script.secrets_path}; grep -c s3cr3t-xyz {script.script_path} || true")
    assert out.stdout.split() == ["600", "0"]
    hook.remove_tree(script.job_dir)


def test_large_output_arrives_whole(slurm_conn):
    """sshd may report the exit status before the last of a big stdout (a sweep's result tar):
    the hook reads to EOF. Before the fix, 5 of 10 reads of 30 MB came back short."""
    hook = SlurmHook()
    size = 30_000_000
    for _ in range(5):
        status, out, _ = hook.exec_bytes(f"head -c {size} /dev/zero")
        assert status == 0 and len(out) == size
