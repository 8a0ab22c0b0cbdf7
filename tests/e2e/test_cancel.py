"""Cancel means cancel: marking a deferred Slurm task failed in Airflow scancels its job."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import FIRST_RUN_TIMEOUT, wait_until

pytestmark = pytest.mark.e2e


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

    try:
        # 900 s: the first e2e test on a fresh stack also builds the training image
        job = wait_until(deferred_job, FIRST_RUN_TIMEOUT, "train task deferred with a Slurm job")
    except BaseException:
        api.patch(f"/dags/train_model/dagRuns/{run_id}", {"state": "failed"})  # no 200-epoch leftover
        raise
    wait_until(lambda: cluster(f"squeue -h -j {job['job_id']} -o %T").strip() == "RUNNING", timeout=120,
               what="job running")
    api.patch(f"/dags/train_model/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"})
    state = wait_until(
        lambda: (s := cluster(f"sacct -n -X -P -j {job['job_id']} -o State").strip()).startswith("CANCELLED") and s,
        120, "job cancelled")
    assert state.startswith("CANCELLED")
    assert cluster(f"squeue -h -j {job['job_id']} -o %T 2>/dev/null || true").strip() in {"", "COMPLETING"}
