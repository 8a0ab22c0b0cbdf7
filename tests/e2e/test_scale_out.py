"""The CeleryExecutor stack (`make up EXECUTOR=celery`): two workers, two triggerers.

A triggerer killed (kill -9, with its descendants) while it follows two trainings hands their
triggers over: each training keeps its one Slurm job, every job line reaches the task log once,
both runs succeed. Skipped on the LocalExecutor stack, where test_recovery.py kills its one
triggerer instead.
"""

from __future__ import annotations

import pytest

from scripts.localstack.config import stack_executor
from tests.e2e.helpers import FIRST_RUN_TIMEOUT, kill_tree, streamed_lines, wait_running, wait_until

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(stack_executor() != "celery", reason="needs `make up EXECUTOR=celery`")]

DAG = "train_model"


def test_a_killed_triggerer_hands_its_triggers_over(api, cluster):
    api.wait_for_dag(DAG)
    runs = [api.trigger(DAG, conf={"max_epochs": 10, "model_name": f"e2e-scale-out-{i}"})["dag_run_id"]
            for i in range(2)]
    paths = [f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train" for run_id in runs]
    for path in paths:
        wait_until(lambda p=path: api.get(p)["state"] == "deferred", FIRST_RUN_TIMEOUT, "train deferred")
    jobs = [api.xcom(DAG, run_id, "train", key="slurm_job") for run_id in runs]
    for run_id, job in zip(runs, jobs, strict=True):
        wait_until(lambda r=run_id, j=job: len(streamed_lines(DAG, r, j["job_id"])) >= 3, 300, "job lines streamed")

    old = kill_tree("airflow-triggerer")
    wait_running("airflow-triggerer", old)

    for run_id in runs:
        assert api.wait_for_run(DAG, run_id, timeout=900)["state"] == "success"
    for run_id, job in zip(runs, jobs, strict=True):
        found = cluster(f"sacct -n -X -P --name={job['job_name']} -S now-3600 -o JobID,State").split()
        assert found == [f"{job['job_id']}|COMPLETED"], found  # one job, never cancelled
        log = cluster(f"cat {job['log_path']}").split("\n")
        if log and log[-1] == "":
            log.pop()
        assert streamed_lines(DAG, run_id, job["job_id"]) == [line.rstrip("\r") for line in log]
