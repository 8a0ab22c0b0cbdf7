"""Several clusters: a run picks its cluster (an SSH connection) with the ``cluster`` Param.

The second cluster here is the same local login node behind its own connection, with its own
job root (connection extra) and its own partition (Variable ``slurmflow_cluster_<id>``): the run
must submit, follow, collect and register there, and nothing of it may land in the default
cluster's job root or partition. An unknown cluster stops at preflight.
"""

from __future__ import annotations

import json
import uuid

import pytest

from scripts.airflow_api import AirflowAPIError

pytestmark = pytest.mark.e2e

CLUSTER = "e2e_cluster_b"


def _delete(api, path: str) -> None:
    try:
        api.delete(path)
    except AirflowAPIError as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def cluster_b(api, stack_env):
    root = "~/cluster-b-jobs"
    _delete(api, f"/connections/{CLUSTER}")
    _delete(api, f"/variables/slurmflow_cluster_{CLUSTER}")
    api.post("/connections", {
        "connection_id": CLUSTER, "conn_type": "ssh", "host": stack_env["SSH_HOST"], "port": int(stack_env["SSH_PORT"]),
        "login": stack_env["SSH_USER"],
        "extra": json.dumps({"key_file": stack_env["SSH_KEY"], "no_host_key_check": True, "job_root": root}),
    })
    api.post("/variables", {"key": f"slurmflow_cluster_{CLUSTER}", "value": json.dumps({"partition": "spot"})})
    yield root
    _delete(api, f"/connections/{CLUSTER}")
    _delete(api, f"/variables/slurmflow_cluster_{CLUSTER}")


def test_a_run_on_another_cluster_uses_its_connection_root_and_settings(run_dag, api, cluster, cluster_b, mlflow_client):
    run, states = run_dag("train_model", {"model_name": f"e2e-cluster-{uuid.uuid4().hex[:6]}", "max_epochs": 1,
                                          "cluster": CLUSTER})
    assert run["state"] == "success", states
    job = api.xcom("train_model", run["dag_run_id"], "train")
    home = cluster("printf %s \"$HOME\"")
    assert job["job_dir"].startswith(f"{home}/cluster-b-jobs/train_model/"), job["job_dir"]
    assert cluster(f"sacct -n -X -j {job['job_id']} -o partition%20").split() == ["spot"]
    reg = api.xcom("train_model", run["dag_run_id"], "register")
    assert mlflow_client.get_run(reg["run_id"]).data.tags["slurm.job_dir"] == job["job_dir"]


def test_an_unknown_cluster_stops_at_preflight(run_dag, api):
    run, states = run_dag("train_model", {"model_name": f"e2e-nocluster-{uuid.uuid4().hex[:6]}",
                                          "cluster": "no_such_cluster"}, timeout=300)
    assert run["state"] == "failed" and states["preflight"] == "failed", states
    assert "unknown cluster 'no_such_cluster'" in api.task_log("train_model", run["dag_run_id"], "preflight")
