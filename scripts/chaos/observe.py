"""What a trial saw: the run's task instances over time, what Slurm really ran for the training's
key, the job log against the lines streamed into the task log, and any secret in any log.

Observation only: nothing here injects or repairs. Slurm is asked with the local clients
(``SLURM_CONF`` of the stack), not over SSH, so the harness keeps seeing the cluster while sshd
is the fault. The pure parts (:func:`line_diff`, :func:`find_secrets`, :func:`key_jobs`) are
unit-tested.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import time
import urllib.error
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scripts.airflow_api import AirflowAPI, AirflowAPIError
from scripts.chaos.phases import Sample
from scripts.localstack.config import STACK
from scripts.localstack.services import SLURM_ENV, services
from tests.e2e.helpers import streamed_lines, trigger_records

DAG = "train_model"
#: Slurm states in which a job still holds (or waits for) resources.
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                         "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"})
#: The masker ignores values shorter than this (docs/CONTRACTS.md, Secrets): so does the scan.
MIN_SECRET_LEN = 5
#: stack.env entries that look like credentials and are not (see :func:`secret_values`).
NOT_SECRET = frozenset({"AIRFLOW_PASSWORD"})
#: What a call to a server that is down raises.
UNREACHABLE = (OSError, AirflowAPIError, http.client.HTTPException, urllib.error.URLError, ValueError)


def answer(call, *args: Any, **kwargs: Any) -> Any:
    """``call(*args)``, or ``None`` when the API server does not answer (it may be the fault)."""
    try:
        return call(*args, **kwargs)
    except UNREACHABLE:
        return None


# --- Slurm -----------------------------------------------------------------------------------------

def slurm(*args: str, timeout: float = 30) -> str:
    """Run a Slurm client on this machine against the stack's cluster; its stdout."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True,
                          env={**os.environ, **SLURM_ENV}).stdout


def key_jobs(lines: Iterable[str], digest: str) -> dict[str, dict[str, str]]:
    """``{job_id: {"name", "state"}}`` for the ``JobID|JobName|State`` lines whose name carries
    the training key's ``digest`` (any generation: ``<task>.<digest>.g<gen>``). The newest line of
    a job wins (sacct prints a requeued job once per run)."""
    jobs: dict[str, dict[str, str]] = {}
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) < 3 or f".{digest}.g" not in parts[1]:
            continue
        job_id = parts[0].split("_")[0].split(".")[0]
        jobs[job_id] = {"name": parts[1], "state": parts[2].split()[0] if parts[2] else ""}
    return jobs


def jobs_of_key(digest: str, since: float) -> dict[str, dict[str, str]]:
    """Every job Slurm ran or runs for the key since ``since`` (epoch seconds): accounting
    (sacct, all users) and the controller's live view (squeue), the live view winning."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))
    jobs = key_jobs(slurm("sacct", "-a", "-n", "-X", "-P", "-S", start, "-o", "JobID,JobName,State").splitlines(),
                    digest)
    jobs.update(live_jobs_of_key(digest))
    return jobs


def live_jobs_of_key(digest: str) -> dict[str, dict[str, str]]:
    """The key's jobs the controller still holds (queued, running, completing...)."""
    found = key_jobs(slurm("squeue", "-h", "-a", "-o", "%i|%j|%T").splitlines(), digest)
    return {j: v for j, v in found.items() if v["state"] in LIVE_STATES}


# --- the run -----------------------------------------------------------------------------------------

def task_states(api: AirflowAPI, run_id: str) -> dict[str, tuple[str | None, int]] | None:
    tis = answer(api.task_instances, DAG, run_id)
    if tis is None:
        return None
    return {t["task_id"]: (t["state"], int(t.get("try_number") or 0)) for t in tis}


def sample(api: AirflowAPI, run_id: str, t: float) -> Sample:
    """One look at the run (``t``: the trial's clock)."""
    run = answer(api.get, f"/dags/{DAG}/dagRuns/{run_id}")
    return Sample(t=round(t, 2), tasks=task_states(api, run_id), run_state=run["state"] if run else None,
                  trigger_records=len(trigger_records(DAG, run_id, "train")))


def settle(timeout: float = 240) -> list[str]:
    """Wait until every stack program runs and passes its own health check (what ``make up``
    checks); the names still unhealthy at the timeout."""
    deadline = time.monotonic() + timeout
    svcs = services()
    while True:
        bad = [s.name for s in svcs if s.health() is not None]
        if not bad or time.monotonic() > deadline:
            return bad
        time.sleep(2)


# --- lines and secrets -----------------------------------------------------------------------------

def line_diff(shown: list[str], log: list[str]) -> dict[str, Any]:
    """Compare the lines streamed into the task log with the job's log (test_recovery's rule:
    equal, in order). ``duplicated``: shown more often than the log has them; ``missing``: in the
    log, not shown (or shown less often)."""
    log = [line.rstrip("\r") for line in log]
    have, want = Counter(shown), Counter(log)
    return {"streamed": len(shown), "job_log": len(log), "exact": shown == log,
            "duplicated": sum(max(0, n - want[line]) for line, n in have.items()),
            "missing": sum(max(0, n - have[line]) for line, n in want.items())}


def job_log_lines(path: str) -> list[str] | None:
    """The job's log (the cluster's home is on this machine); ``None`` if unreadable."""
    try:
        lines = Path(path).read_text(errors="replace").split("\n")
    except OSError:
        return None
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def stream_check(run_id: str, job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """:func:`line_diff` for the train task's job (``None`` when no job was recorded)."""
    if not job or not job.get("log_path"):
        return None
    log = job_log_lines(job["log_path"])
    if log is None:
        return {"error": f"job log {job['log_path']} unreadable"}
    return line_diff(streamed_lines(DAG, run_id, str(job["job_id"])), log)


def secret_values(stack_env: Mapping[str, str], secrets_file: Path | None = None) -> dict[str, str]:
    """Every credential of the stack, by name: the generated ones (``.stack/secrets.env``) and
    the passwords of ``stack.env``, the short ones left out (never masked, never scanned).

    The Airflow UI login (admin/admin, dev-only and documented) is no credential the pipeline
    handles: the word "admin" is in many honest log lines (MLflow's user is ``admin``).
    """
    found = {}
    path = STACK / "secrets.env" if secrets_file is None else secrets_file
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    for name, value in stack_env.items():
        if any(w in name for w in ("PASSWORD", "SECRET", "TOKEN")) and name not in NOT_SECRET:
            found[name] = value
    return {k: v for k, v in found.items() if len(v) >= MIN_SECRET_LEN}


def find_secrets(texts: Mapping[str, str], secrets: Mapping[str, str]) -> list[dict[str, str]]:
    """``[{"secret": name, "where": text name}]`` for every secret value found in a text.
    Names only: a report must not leak what it found."""
    return [{"secret": name, "where": where} for where, text in texts.items()
            for name, value in secrets.items() if value in text]


def run_log_texts(run_id: str, job: Mapping[str, Any] | None) -> dict[str, str]:
    """Every log of the run: each task's attempt and trigger logs on disk, and the job's logs."""
    folder = STACK / "airflow" / "logs" / f"dag_id={DAG}" / f"run_id={run_id}"
    texts = {str(p.relative_to(STACK)): p.read_text(errors="replace") for p in sorted(folder.rglob("*"))
             if p.is_file()}
    if job and job.get("job_dir"):
        for path in sorted(Path(job["job_dir"]).glob("slurm-*.out")):
            texts[str(path)] = path.read_text(errors="replace")
    return texts
