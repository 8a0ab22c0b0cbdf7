"""The real Airflow of the local stack, driven through its REST API (like ``make demo``)."""

from __future__ import annotations

import subprocess

import pytest

from scripts.airflow_api import AirflowAPI

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def api(stack_env) -> AirflowAPI:
    return AirflowAPI(stack_env["AIRFLOW_URL"], stack_env["AIRFLOW_USER"], stack_env["AIRFLOW_PASSWORD"])


@pytest.fixture(scope="session")
def run_dag(api):
    """Trigger a DAG (unpausing it) and wait for the run; return (run, task states)."""

    def run(dag_id: str, conf: dict | None = None, logical_date: str | None = None, timeout: float = 900):
        api.wait_for_dag(dag_id)
        created = api.trigger(dag_id, conf=conf or {}, logical_date=logical_date)
        finished = api.wait_for_run(dag_id, created["dag_run_id"], timeout=timeout)
        states = {ti["task_id"]: ti["state"] for ti in api.task_instances(dag_id, created["dag_run_id"])}
        return finished, states

    return run


@pytest.fixture(scope="session")
def cluster(stack_env):
    """Run a command on the login node as the cluster user."""

    def ssh(command: str) -> str:
        return subprocess.run(
            ["ssh", "-i", stack_env["SSH_KEY"], "-p", stack_env["SSH_PORT"], "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             f"{stack_env['SSH_USER']}@{stack_env['SSH_HOST']}", command],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout

    return ssh


@pytest.fixture(scope="session")
def mlflow_client(stack_env):
    import os

    import mlflow

    os.environ["MLFLOW_TRACKING_USERNAME"] = stack_env["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack_env["MLFLOW_TRACKING_PASSWORD"]
    return mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="session")
def catalog_db(stack_env):
    import pymongo

    client = pymongo.MongoClient(stack_env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    yield client["slurmflow"]
    client.close()
