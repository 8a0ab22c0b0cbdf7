"""Small helpers shared by the e2e tests: waiting for a condition, reading the triggerer's logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scripts.localstack.config import STACK


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned); ``TimeoutError`` names ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def trigger_logs(dag_id: str, run_id: str, task_id: str) -> list[Path]:
    """The triggerer's log files of a task instance (every attempt, every triggerer that ran it)."""
    folder = STACK / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return sorted(folder.glob("attempt=*.log.trigger.*.log"))


def trigger_records(dag_id: str, run_id: str, task_id: str) -> list[dict]:
    """The JSON records of those files, oldest first."""
    records = []
    for path in trigger_logs(dag_id, run_id, task_id):
        for raw in path.read_text().splitlines():
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue
    return sorted(records, key=lambda r: r.get("timestamp", ""))
