"""experiment_pipeline end to end: cached stages submit no job, a param change reruns only the
stages downstream of it, two concurrent identical runs prepare once (issue 13 item 1).

Each test draws its own ``data_seed``, so its first run starts from a cold cache.
"""

from __future__ import annotations

import random
import time

import pytest

from scripts.airflow_api import AirflowAPIError

pytestmark = pytest.mark.e2e

DAG = "experiment_pipeline"
STAGES = ("prepare", "train", "evaluate")


def _conf(**extra) -> dict:
    return {"data_seed": random.randrange(1, 2**31 - 1), "rows": 512, "holdout_rows": 128, "max_epochs": 1, **extra}


def _stages(api, run_id: str) -> dict[str, dict]:
    return {s: api.xcom(DAG, run_id, s) for s in STAGES}


def _specs(api, run_id: str) -> dict[str, dict]:
    return {s: api.xcom(DAG, run_id, f"{s}_spec") for s in STAGES}


def _sacct_jobs(cluster, run_id: str, stage: str) -> list[str]:
    """The Slurm jobs of one stage task of one run, by the job name its identity gives it."""
    from slurmflow.identity import JobKey

    name = JobKey(DAG, run_id, stage).job_name(0)
    return cluster(f"sacct -X -n -P -S now-1days --name={name} -o JobID").split()


def test_second_run_submits_no_job_and_both_are_recorded(run_dag, api, cluster, mlflow_client, catalog_db):
    conf = _conf()
    started = time.monotonic()
    first, states = run_dag(DAG, conf)
    cold = time.monotonic() - started
    assert first["state"] == "success", states
    one = _stages(api, first["dag_run_id"])
    assert all(not r.get("cached") and r["state"] == "COMPLETED" for r in one.values()), one
    started = time.monotonic()
    second, states = run_dag(DAG, conf)
    cached = time.monotonic() - started
    assert second["state"] == "success", states
    two = _stages(api, second["dag_run_id"])
    assert all(r["cached"] for r in two.values()), two  # no stage submitted a job
    with pytest.raises(AirflowAPIError, match="404"):  # the stage task pushed no Slurm job
        api.xcom(DAG, second["dag_run_id"], "prepare", key="slurm_job")
    assert _sacct_jobs(cluster, second["dag_run_id"], "prepare") == []
    print(f"experiment_pipeline wall time: cold {cold:.0f} s, cached {cached:.0f} s")
    # the same keys, the entry is on the cluster with its stage.json, group-shareable mode
    specs1, specs2 = _specs(api, first["dag_run_id"]), _specs(api, second["dag_run_id"])
    assert {s: v["key"] for s, v in specs1.items()} == {s: v["key"] for s, v in specs2.items()}
    listing = cluster(f"ls -ld {specs1['prepare']['entry']} && cat {specs1['prepare']['entry']}/stage.json")
    assert listing.startswith("drwxrws---") and specs1["prepare"]["key"] in listing
    # MLflow: one run per pipeline run, every stage's params and key
    report = api.xcom(DAG, second["dag_run_id"], "report")
    run = mlflow_client.get_run(report["run_id"])
    for stage in STAGES:
        assert run.data.params[f"{stage}.key"] == specs2[stage]["key"]
        assert run.data.tags[f"stage.{stage}.cached"] == "true"
    assert run.data.params["prepare.data_seed"] == str(conf["data_seed"]) and run.data.params["train.lr"]
    assert any(k.startswith("holdout/") for k in run.data.metrics)
    # the catalog: which runs used this dataset
    docs = list(catalog_db["pipelines"].find({"dataset_key": specs1["prepare"]["key"]}))
    assert {d["run_id"] for d in docs} == {first["dag_run_id"], second["dag_run_id"]}


def test_a_train_param_change_reruns_only_train_and_evaluate(run_dag, api):
    conf = _conf()
    first, states = run_dag(DAG, conf)
    assert first["state"] == "success", states
    changed, states = run_dag(DAG, {**conf, "lr": 0.01})
    assert changed["state"] == "success", states
    before, after = _specs(api, first["dag_run_id"]), _specs(api, changed["dag_run_id"])
    assert before["prepare"]["key"] == after["prepare"]["key"]
    assert before["train"]["key"] != after["train"]["key"] and before["evaluate"]["key"] != after["evaluate"]["key"]
    stages = _stages(api, changed["dag_run_id"])
    assert stages["prepare"]["cached"] is True
    assert stages["train"]["state"] == "COMPLETED" and stages["evaluate"]["state"] == "COMPLETED"
    assert not stages["train"].get("cached") and not stages["evaluate"].get("cached")


def test_two_concurrent_identical_runs_prepare_once(api, cluster):
    conf = _conf()
    api.wait_for_dag(DAG)
    runs = [api.trigger(DAG, conf=conf)["dag_run_id"] for _ in range(2)]
    for run_id in runs:
        assert api.wait_for_run(DAG, run_id, timeout=900)["state"] == "success"
    prepared = [api.xcom(DAG, run_id, "prepare") for run_id in runs]
    # Either the second saw the entry before submitting (no job), or both submitted and the
    # job-side lock made the second find the first's entry: one computation either way.
    outcomes = [cluster(f"cat {p['job_dir']}/stage-outcome").strip() for p in prepared if not p.get("cached")]
    assert outcomes.count("computed") == 1, (prepared, outcomes)
    assert len(outcomes) + sum(1 for p in prepared if p.get("cached")) == 2
