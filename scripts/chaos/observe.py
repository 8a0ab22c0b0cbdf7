"""What a trial saw: the run's task instances over time, what Slurm really ran for the training's
key, the job log against the lines streamed into the task log, and any secret in any log.

Observation only: nothing here injects or repairs. Slurm is asked with the local clients
(``SLURM_CONF`` of the stack), not over SSH, so the harness keeps seeing the cluster while sshd
is the fault. The pure parts (:func:`line_diff`, :func:`find_secrets`, :func:`key_jobs`) are
unit-tested.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
import urllib.error
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.airflow_api import AirflowAPI, AirflowAPIError
from scripts.chaos.phases import Sample
from scripts.localstack.config import STACK
from scripts.localstack.services import SLURM_ENV, services
from tests.conftest import read_stack_env
from tests.e2e.helpers import streamed_lines, trigger_records

#: The DAG a trial drives unless its phase names another (:attr:`scripts.chaos.table.Phase.dag`).
DAG = "train_model"
#: Slurm states in which a job still holds (or waits for) resources.
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                         "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"})
#: The masker ignores values shorter than this (docs/CONTRACTS.md, Secrets): so does the scan.
MIN_SECRET_LEN = 5
#: stack.env entries that look like credentials and are not (see :func:`secret_values`).
NOT_SECRET = frozenset({"AIRFLOW_PASSWORD"})
#: What Airflow's secrets masker writes in place of a value it masks.
MASK = "***"
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


#: The RPC types squeue and its kin send: what a poller costs the controller.
JOB_INFO_RPCS = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO")


def parse_sdiag(text: str, user: str) -> dict[str, int]:
    """``{"job_info_rpcs", "user_rpcs"}`` from ``sdiag`` output: the job-info RPCs the controller
    served (any user) and every RPC of ``user``; counts since the controller's last reset."""
    counts = {"user_rpcs": 0, "job_info_rpcs": 0}
    m = re.search(rf"^\s*{re.escape(user)}\s+\(\s*\d+\)\s+count:(\d+)", text, re.M)
    if m:
        counts["user_rpcs"] = int(m.group(1))
    for kind in JOB_INFO_RPCS:
        m = re.search(rf"^\s*{kind}\s+\(\s*\d+\)\s+count:(\d+)", text, re.M)
        if m:
            counts["job_info_rpcs"] += int(m.group(1))
    return counts


def key_jobs(lines: Iterable[str], digest: str) -> dict[str, dict[str, Any]]:
    """``{job_id: {"name", "generation", "state", "submit", "end"}}`` for the
    ``JobID|JobName|State|Submit|End`` lines whose name carries the training key's ``digest``
    (any generation: ``<task>.<digest>.g<gen>``). ``submit``/``end`` are Slurm's ISO times,
    ``None`` when unknown or not yet (``Unknown``, ``N/A``). The newest line of a job wins
    (sacct prints a requeued job once per run)."""
    jobs: dict[str, dict[str, Any]] = {}
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) < 3 or f".{digest}.g" not in parts[1]:
            continue
        job_id = parts[0].split("_")[0].split(".")[0]
        times = [t if t and t[0].isdigit() else None for t in (parts[3:5] + [None, None])[:2]]
        jobs[job_id] = {"name": parts[1], "generation": int(parts[1].rsplit(".g", 1)[1] or 0),
                        "state": parts[2].split()[0] if parts[2] else "", "submit": times[0], "end": times[1]}
    return jobs


def duplicate_jobs(jobs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The jobs that should not exist: submitted while an earlier job of the same key was still
    live (no end yet, or an end after this submission), or after an earlier job of the same
    generation COMPLETED (its result was to be reused). A job submitted after the earlier one
    failed or was cancelled is a retry, and a new generation after a clear is a retrain: neither
    is a duplicate. Slurm's times are ISO strings of one clock, so they compare as strings."""
    order = sorted(jobs, key=lambda j: (jobs[j].get("submit") or "", int(j)))
    found = []
    for n, job in enumerate(order):
        submit = jobs[job].get("submit") or ""
        for earlier in order[:n]:
            e = jobs[earlier]
            overlapped = e.get("end") is None or e["end"] > submit
            reused = e.get("state") == "COMPLETED" and e.get("generation") == jobs[job].get("generation")
            if overlapped or reused:
                found.append(job)
                break
    return found


def jobs_of_key(digest: str, since: float) -> dict[str, dict[str, Any]]:
    """Every job Slurm ran or runs for the key since ``since`` (epoch seconds): accounting
    (sacct, all users) and the controller's live view (squeue), the live view winning."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))
    jobs = key_jobs(slurm("sacct", "-a", "-n", "-X", "-P", "-S", start, "-o",
                          "JobID,JobName,State,Submit,End").splitlines(), digest)
    for job_id, live in live_jobs_of_key(digest).items():
        jobs[job_id] = {**jobs.get(job_id, {}), **{k: v for k, v in live.items() if v is not None}}
    return jobs


def live_jobs_of_key(digest: str) -> dict[str, dict[str, Any]]:
    """The key's jobs the controller still holds (queued, running, completing...)."""
    found = key_jobs(slurm("squeue", "-h", "-a", "-o", "%i|%j|%T|%V|%e").splitlines(), digest)
    return {j: {**v, "end": None} for j, v in found.items() if v["state"] in LIVE_STATES}


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (empty once the controller forgot the job)."""
    try:
        out = slurm("scontrol", "-o", "show", "job", str(job_id))
    except subprocess.CalledProcessError:
        return {}
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def restarts(job_id: str) -> int:
    """How often Slurm restarted the job (requeue, preemption, node failure)."""
    return int(job_fields(job_id).get("Restarts", 0))


def attempts(job_dir: str) -> list[dict[str, Any]]:
    """hpctrain's attempt rows of a job (``.hpctrain/attempts.json``; the cluster's home is here)."""
    try:
        rows = json.loads((Path(job_dir) / ".hpctrain" / "attempts.json").read_text())
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def attempt_training(job_dir: str, restart: int) -> bool:
    """Attempt ``restart`` of the job is past start-up (its row says ``running``)."""
    return any(a.get("restart") == restart and a.get("status") == "running" for a in attempts(job_dir))


def steps_redone(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Work trained twice across a job's attempts: for each attempt after the first, the steps
    between where it resumed and where the previous one had got to. A previous row left
    ``running`` was killed without saying how far it got: counted in ``unknown``."""
    redone, unknown = 0, 0
    for prev, cur in zip(rows, rows[1:], strict=False):
        if cur.get("start_step") is None:
            continue
        if prev.get("end_step") is None:
            unknown += prev.get("start_step") is not None
            continue
        redone += max(0, int(prev["end_step"]) - int(cur["start_step"]))
    return {"attempts": len(rows), "steps_redone": redone, "attempts_unknown": unknown}


def submit_urgent(node: str = "local1") -> str:
    """Submit, as the cluster user, a short ``urgent`` job that needs half the training's memory
    beyond what ``node`` has free, on that node: Slurm preempts the spot training to run it (a
    single-node training runs on local1, the node Slurm fills first)."""
    fields = dict(kv.split("=", 1) for kv in slurm("scontrol", "-o", "show", "node", node).split() if "=" in kv)
    mem = int(fields["RealMemory"]) - int(fields["AllocMem"]) + 1024
    env = read_stack_env()
    return slurm("runuser", "-u", env["SSH_USER"], "--", "sbatch", "--parsable", "-p", "urgent", "-A",
                 env["SLURM_ACCOUNT"], "-c", "1", "-w", node, f"--mem={mem}M", "--job-name=chaos-urgent",
                 "--output=/dev/null", "--wrap", "sleep 3").strip()


# --- the run -----------------------------------------------------------------------------------------

def task_states(api: AirflowAPI, run_id: str, dag: str = DAG) -> dict[str, tuple[str | None, int]] | None:
    tis = answer(api.task_instances, dag, run_id)
    if tis is None:
        return None
    return {t["task_id"]: (t["state"], int(t.get("try_number") or 0)) for t in tis}


def sample(api: AirflowAPI, run_id: str, t: float, dag: str = DAG) -> Sample:
    """One look at the run (``t``: the trial's clock)."""
    run = answer(api.get, f"/dags/{dag}/dagRuns/{run_id}")
    return Sample(t=round(t, 2), tasks=task_states(api, run_id, dag), run_state=run["state"] if run else None,
                  trigger_records=len(trigger_records(dag, run_id, "train")))


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
    log, not shown (or shown less often). A shown line the masker changed (``***`` in place of a
    value it masks) stands for the log line at the same place it matches."""
    log = [line.rstrip("\r") for line in log]
    shown = [_unmask(line, log[i]) if i < len(log) else line for i, line in enumerate(shown)]
    have, want = Counter(shown), Counter(log)
    return {"streamed": len(shown), "job_log": len(log), "exact": shown == log,
            "duplicated": sum(max(0, n - want[line]) for line, n in have.items()),
            "missing": sum(max(0, n - have[line]) for line, n in want.items())}


def _unmask(shown: str, original: str) -> str:
    """``original`` if ``shown`` is it with masked parts (``***``), else ``shown``."""
    if shown == original or MASK not in shown:
        return shown
    pattern = ".+".join(re.escape(part) for part in shown.split(MASK))
    return original if re.fullmatch(pattern, original) else shown


def job_log_lines(path: str) -> list[str] | None:
    """The job's log (the cluster's home is on this machine); ``None`` if unreadable."""
    try:
        lines = Path(path).read_text(errors="replace").split("\n")
    except OSError:
        return None
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def stream_check(run_id: str, job: Mapping[str, Any] | None, dag: str = DAG) -> dict[str, Any] | None:
    """:func:`line_diff` for the train task's job (``None`` when no job was recorded)."""
    if not job or not job.get("log_path"):
        return None
    log = job_log_lines(job["log_path"])
    if log is None:
        return {"error": f"job log {job['log_path']} unreadable"}
    return line_diff(streamed_lines(dag, run_id, str(job["job_id"])), log)


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


def run_log_texts(run_id: str, job: Mapping[str, Any] | None, dag: str = DAG) -> dict[str, str]:
    """Every log of the run: each task's attempt and trigger logs on disk, and the job's logs."""
    folder = STACK / "airflow" / "logs" / f"dag_id={dag}" / f"run_id={run_id}"
    texts = {str(p.relative_to(STACK)): p.read_text(errors="replace") for p in sorted(folder.rglob("*"))
             if p.is_file()}
    if job and job.get("job_dir"):
        for path in sorted(Path(job["job_dir"]).glob("slurm-*.out")):
            texts[str(path)] = path.read_text(errors="replace")
    return texts


# --- what the run registered --------------------------------------------------------------------

def registrations(run_id: str, model: str, dag: str = DAG) -> dict[str, Any]:
    """What the run left in MLflow and the catalog, per generation (``str`` keys, as in JSON):
    MLflow runs carrying its run key, model versions of ``model`` from those runs, catalog
    documents. One of each per generation that got so far; more is a duplicate registration."""
    import mlflow
    import pymongo

    env = read_stack_env()
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`slurmflow.run_key` LIKE '{dag}/{run_id}/%'", max_results=100)
    mlflow_runs = Counter(r.data.tags["slurmflow.run_key"].rsplit("/g", 1)[1] for r in runs)
    ours = {r.info.run_id for r in runs}
    versions = [v.version for v in client.search_model_versions(f"name = '{model}'") if v.run_id in ours]
    with pymongo.MongoClient(env["MONGO_URI"], serverSelectionTimeoutMS=10000) as mongo:
        docs = Counter(str(d.get("generation")) for d in mongo["slurmflow"]["runs"].find(
            {"dag_id": dag, "run_id": run_id}, {"generation": 1}))
    return {"mlflow_runs": dict(mlflow_runs), "model_versions": len(versions), "catalog_docs": dict(docs)}


def duplicate_registrations(reg: Mapping[str, Any]) -> int:
    """How many MLflow runs, model versions and catalog documents are beyond one per generation
    (a generation is counted once it has an MLflow run)."""
    runs = reg.get("mlflow_runs") or {}
    extra = sum(max(0, n - 1) for n in runs.values()) + sum(max(0, n - 1) for n in (reg.get("catalog_docs") or {}).values())
    return extra + max(0, int(reg.get("model_versions") or 0) - len(runs))
