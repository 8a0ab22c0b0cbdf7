"""Small helpers shared by the e2e tests and the chaos harness (scripts/chaos): waiting for a
condition, killing a stack program with its descendants, reading the triggerer's logs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

from scripts.localstack.__main__ import supervisor
from scripts.localstack.config import STACK

#: How long a run may take to reach its train task on a fresh stack: the first run builds the
#: training image (about 6 minutes on a 2-core machine).
FIRST_RUN_TIMEOUT = 900


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned); ``TimeoutError`` names ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each process; one already gone is fine."""
    for victim in pids:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_tree(program: str) -> int:
    """kill -9 a stack program and all its descendants - for the scheduler, under LocalExecutor,
    the executor's workers and the task processes they run (what a crashed host does)."""
    pid = supervisor().getProcessInfo(program)["pid"]
    kill_pids([pid, *descendants(pid)])
    return pid


def wait_running(program: str, old_pid: int, timeout: float = 60) -> dict:
    """Wait until supervisord runs ``program`` again under a new pid; return its process info."""
    return wait_until(lambda: (info := supervisor().getProcessInfo(program))["statename"] == "RUNNING"
                      and info["pid"] != old_pid and info, timeout, f"{program} restarted by supervisord")


def trigger_logs(dag_id: str, run_id: str, task_id: str) -> list[Path]:
    """The triggerer's log files of a task instance (every attempt, every triggerer that ran it)."""
    folder = STACK / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return sorted(folder.glob("attempt=*.log.trigger.*.log"))


def trigger_records(dag_id: str, run_id: str, task_id: str) -> list[dict]:
    """The JSON records of those files, oldest first."""
    return _records(trigger_logs(dag_id, run_id, task_id))


def _records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        for raw in path.read_text().splitlines():
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue
    return sorted(records, key=lambda r: r.get("timestamp", ""))


def streamed_lines(dag_id: str, run_id: str, job_id: str, task_id: str = "train",
                   attempt: int | None = None) -> list[str]:
    """The job's lines in a task's logs, in order: its trigger logs (every trigger that ran it)
    and its own attempt logs (a try that found the job already ended shows the log itself).

    :param attempt: only this try's logs (default: every try's).
    """
    prefix = f"[slurm {job_id}] "
    folder = STACK / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    files = sorted(folder.glob(f"attempt={attempt if attempt is not None else '*'}.log*"))
    events = (str(r.get("event", "")) for r in _records(files))
    return [e[len(prefix):] for e in events if e.startswith(prefix)]


# --- preemption on the local cluster (test_preemption.py, test_multinode.py) ---------------------

def job_fields(cluster, job_id: str) -> dict[str, str]:
    out = cluster(f"scontrol -o show job {job_id} 2>/dev/null || true")
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def free_memory_mb(cluster, node: str) -> int:
    fields = dict(kv.split("=", 1) for kv in cluster(f"scontrol -o show node {node}").split() if "=" in kv)
    return int(fields["RealMemory"]) - int(fields["AllocMem"])


def attempts(cluster, job_dir: str) -> list[dict]:
    """hpctrain's attempt rows (``.hpctrain/attempts.json``): where each attempt started/stopped."""
    out = cluster(f"cat {shlex.quote(job_dir)}/.hpctrain/attempts.json 2>/dev/null || true").strip()
    return json.loads(out) if out else []


def training(cluster, job_dir: str, restart: int) -> bool:
    """Attempt ``restart`` is past start-up: its row says it is training."""
    return any(a["restart"] == restart and a["status"] == "running" for a in attempts(cluster, job_dir))


def preempt(cluster, job_id: str, restarts: int, node: str = "local1", train_mem_mb: int = 2048) -> str:
    """Submit an urgent job that fits on ``node`` only by taking the training's memory there
    (half its ``train_mem_mb`` beyond what is free); return once Slurm requeued the training."""
    mem = free_memory_mb(cluster, node) + train_mem_mb // 2
    urgent = cluster(f"sbatch --parsable -p urgent -A research -c 1 -w {node} --mem={mem}M "
                     "--job-name=e2e-urgent --output=/dev/null --wrap 'sleep 3'").strip()
    wait_until(lambda: int(job_fields(cluster, job_id).get("Restarts", 0)) == restarts + 1, 90,
               f"job {job_id} requeued by urgent job {urgent}")
    return urgent
