"""Shared fixtures and helpers of the Slurm integration tests (imported by test_slurm_*.py).

Everything here talks to the real local stack: sshd on 127.0.0.1:2222 and Slurm 22.05 with
slurmdbd. The Airflow connection ``slurm_default`` is an environment variable built from
``stack_env`` (no metadata DB needed); operators run with a stand-in task instance and their
triggers run in this process's event loop, as the triggerer would run them.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import time
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration


class LiveTI:
    """The task-instance surface the operator uses (ids, tries, XCom)."""

    def __init__(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, max_tries: int = 0,
                 map_index: int = -1) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, map_index
        self.try_number, self.max_tries = try_number, max_tries
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def xcom_pull(self, task_ids=None, key=None, map_indexes=None):
        return self.xcom.get(key)


class RecordingLog:
    """Stands in for a trigger's logger: keeps (monotonic time, line)."""

    def __init__(self) -> None:
        self.records: list[tuple[float, str]] = []

    def _record(self, msg, *args, **kwargs):
        self.records.append((time.monotonic(), msg % args if args else str(msg)))

    info = warning = error = debug = exception = _record

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.records]


@pytest.fixture
def slurm_conn(stack_env, monkeypatch):
    """``slurm_default`` pointing at the local login node, with a per-test job root."""
    root = f"{stack_env['CLUSTER_JOB_ROOT']}/it-{uuid.uuid4().hex[:8]}"
    conn = {
        "conn_type": "ssh",
        "host": stack_env["SSH_HOST"],
        "port": int(stack_env["SSH_PORT"]),
        "login": stack_env["SSH_USER"],
        "extra": {"key_file": stack_env["SSH_KEY"], "no_host_key_check": True, "job_root": root},
    }
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps(conn))
    # Fast polling for tests; the poller registry is per event loop, so each test gets its own.
    from slurmflow import poller

    monkeypatch.setattr(poller, "COALESCE_SECONDS", 0.05)
    monkeypatch.setattr(poller, "LINGER_SECONDS", 0.0)
    return {**conn, "job_root": root, "account": stack_env["SLURM_ACCOUNT"], "partition": stack_env["SLURM_PARTITION"]}


def ssh(env: dict[str, str], command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command on the login node with the OpenSSH client (an independent witness)."""
    return subprocess.run(
        ["ssh", "-i", env["SSH_KEY"], "-p", env["SSH_PORT"], "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         f"{env['SSH_USER']}@{env['SSH_HOST']}", command],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def sacct_jobs_named(env: dict[str, str], name: str) -> list[tuple[str, str]]:
    """(job id, state) of every allocation with this name, as accounting sees it."""
    out = ssh(env, f"sacct -n -P -X -S now-1days --name={shlex.quote(name)} -o JobID,State")
    assert out.returncode == 0, out.stderr
    return [tuple(line.split("|")[:2]) for line in out.stdout.splitlines() if line.strip()]


def sacct_settled(env: dict[str, str], name: str, expected: list[str], timeout: float = 20) -> list[tuple[str, str]]:
    """Accounting lags the controller by a moment: poll sacct until it shows ``expected`` states."""
    deadline = time.monotonic() + timeout
    jobs = sacct_jobs_named(env, name)
    while [state for _, state in jobs] != expected and time.monotonic() < deadline:
        time.sleep(1)
        jobs = sacct_jobs_named(env, name)
    return jobs


def wait_state(env: dict[str, str], job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = ssh(env, f"squeue -h -t all -j {int(job_id)} -o %T; sacct -n -P -X -j {int(job_id)} -o State")
        state = (out.stdout.split() or [""])[0]
        if state.split()[0] in states if state else False:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {states} (last {state!r})")


def new_run_id() -> str:
    return f"it__{uuid.uuid4().hex[:10]}"


def make_operator(slurm_conn, task_id: str = "train", **kw):
    from slurmflow.operators.slurm import SlurmSubmitJobOperator

    options = {"account": slurm_conn["account"], "partition": slurm_conn["partition"], "time": "5"}
    options.update(kw.pop("sbatch_options", {}))
    kw.setdefault("poll_interval", 0.5)
    kw.setdefault("max_poll_interval", 1.0)
    return SlurmSubmitJobOperator(task_id=task_id, sbatch_options=options, **kw)


def start(op, ti: LiveTI):
    """Render and execute; return (context, TaskDeferred or result)."""
    from airflow.sdk.exceptions import TaskDeferred

    ctx = {"ti": ti}
    op.render_template_fields(ctx)
    try:
        return ctx, op.execute(ctx)
    except TaskDeferred as deferred:
        return ctx, deferred


async def first_event(trigger, log: RecordingLog | None = None, timeout: float = 120):
    if log is not None:
        trigger._log = log
    gen = trigger.run()
    try:
        event = await asyncio.wait_for(gen.__anext__(), timeout)
    finally:
        await gen.aclose()
    return event.payload


def run_to_completion(op, ti: LiveTI, log: RecordingLog | None = None, timeout: float = 120):
    """Submit, run the trigger as the triggerer would, resume the operator with the event."""
    from airflow.sdk.exceptions import TaskDeferred

    ctx, deferred = start(op, ti)
    if not isinstance(deferred, TaskDeferred):
        return deferred, None
    payload = asyncio.run(first_event(deferred.trigger, log, timeout))
    return op.execute_complete(ctx, payload, **deferred.kwargs), payload
