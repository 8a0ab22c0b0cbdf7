"""Cancel means cancel: marking a deferred Slurm task failed in Airflow scancels its job."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def test_marking_deferred_task_failed_cancels_the_job(api, cluster):
    api.wait_for_dag("train_model")
    # Long enough to still be running when we pull the plug.
    run = api.trigger("train_model", conf={"max_epochs": 200, "model_name": "e2e-cancel"})
    run_id = run["dag_run_id"]

    def deferred_job():
        ti = api.get(f"/dags/train_model/dagRuns/{run_id}/taskInstances/train")
        if ti["state"] != "deferred":
            return None
        return api.xcom("train_model", run_id, "train", key="slurm_job")

    job = wait_until(deferred_job, timeout=300, what="train task deferred with a Slurm job")
    wait_until(lambda: cluster(f"squeue -h -j {job['job_id']} -o %T").strip() == "RUNNING", timeout=120,
               what="job running")
    api.patch(f"/dags/train_model/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"})
    state = wait_until(
        lambda: (s := cluster(f"sacct -n -X -P -j {job['job_id']} -o State").strip()).startswith("CANCELLED") and s,
        timeout=120, what="job cancelled")
    assert state.startswith("CANCELLED")
    assert cluster(f"squeue -h -j {job['job_id']} -o %T 2>/dev/null || true").strip() in {"", "COMPLETING"}
    # The trigger did it, after the real API told it the task is no longer deferred on this job
    # (not the reap step, which would also cancel it a little later).
    said = wait_until(lambda: any("Task instance stopped by a user action: cancelling Slurm job "
                                  f"{job['job_id']}" in line for line in trigger_events(run_id)),
                      timeout=60, what="the trigger's on_kill log line")
    assert said


def trigger_events(run_id: str) -> list[str]:
    import json

    from scripts.localstack.config import STACK

    folder = STACK / "airflow" / "logs" / "dag_id=train_model" / f"run_id={run_id}" / "task_id=train"
    events = []
    for path in folder.glob("attempt=*.log.trigger.*.log"):
        for raw in path.read_text().splitlines():
            try:
                events.append(str(json.loads(raw).get("event", "")))
            except ValueError:
                continue
    return events
