"""nightly_retrain and hparam_sweep end to end on the local stack, through the REST API and CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid

import pytest

from scripts.localstack.config import airflow_env

pytestmark = pytest.mark.e2e


def test_nightly_promotes_better_and_keeps_champion_over_worse(run_dag, api, mlflow_client, catalog_db):
    model = f"e2e-nightly-{uuid.uuid4().hex[:6]}"
    good, states = run_dag("nightly_retrain", {"model_name": model, "max_epochs": 4})
    assert good["state"] == "success", states
    first = api.xcom("nightly_retrain", good["dag_run_id"], "evaluate_and_promote")
    assert first["promote"] is True and first["reason"] == "no champion yet"
    champion = mlflow_client.get_model_version_by_alias(model, "champion")

    # A much weaker challenger: one epoch at a tiny learning rate, evaluated on the same held-out data.
    worse, states = run_dag("nightly_retrain", {"model_name": model, "max_epochs": 1, "lr": 1e-5})
    assert worse["state"] == "success", states
    decision = api.xcom("nightly_retrain", worse["dag_run_id"], "evaluate_and_promote")
    assert decision["promote"] is False
    assert decision["challenger"] > decision["champion"]
    assert "not more than the required" in decision["reason"]
    assert mlflow_client.get_model_version_by_alias(model, "champion").version == champion.version
    challenger = mlflow_client.get_model_version(model, decision["challenger_version"])
    assert challenger.tags["promotion.decision"] == "rejected"
    doc = catalog_db["runs"].find_one({"run_key": f"nightly_retrain/{worse['dag_run_id']}/train/-1/g0"})
    assert doc["promotion"]["promote"] is False and doc["promotion"]["reason"] == decision["reason"]


def test_sweep_runs_all_trials_as_one_array(run_dag, api, mlflow_client, catalog_db):
    model = f"e2e-sweep-{uuid.uuid4().hex[:6]}"
    conf = {"model_name": model, "search_space": {"lr": [0.001, 0.01], "width": [16, 32]}, "max_parallel": 2}
    run, states = run_dag("hparam_sweep", conf)
    assert run["state"] == "success", states
    job = api.xcom("hparam_sweep", run["dag_run_id"], "train")
    assert job["array"]["total"] == 4 and job["array"]["counts"] == {"COMPLETED": 4}
    spec = api.xcom("hparam_sweep", run["dag_run_id"], "job_spec")
    assert spec["sbatch_options"]["array"] == "0-3%2"
    sweep = api.xcom("hparam_sweep", run["dag_run_id"], "register")
    assert len(sweep["trials"]) == 4 and len({t["run_id"] for t in sweep["trials"]}) == 4
    best = min(sweep["trials"], key=lambda t: t["metrics"][sweep["metric"]])
    assert sweep["best"]["trial"] == best["trial"]
    assert [v.run_id for v in mlflow_client.search_model_versions(f"name = '{model}'")] == [best["run_id"]]
    plots = [a.path for a in mlflow_client.list_artifacts(sweep["summary_run_id"], "plots")]
    assert plots == ["plots/metric_vs_hyperparameters.png"]
    doc = catalog_db["sweeps"].find_one({"sweep_key": job["run_key"]})
    assert job["run_key"] == f"hparam_sweep/{run['dag_run_id']}/train/-1/g0"
    assert len(doc["trials"]) == 4 and doc["best_trial"] == best["trial"]
    # the best trial's registered version is an MLflow Model too
    version = mlflow_client.search_model_versions(f"name = '{model}'")[0]
    assert "model/MLmodel" in [a.path for a in mlflow_client.list_artifacts(version.run_id, "model")]
    assert mlflow_client.get_run(best["run_id"]).data.tags["slurmflow.run_key"] == f"{job['run_key']}/trial-{best['trial']}"


def test_backfill_over_two_dates_runs_both(api):
    conf = {"search_space": {"lr": [0.003]}, "max_epochs": 1, "model_name": f"e2e-backfill-{uuid.uuid4().hex[:6]}"}
    # Two days inside the campaign data `make up` seeds (the last 8 days).
    days = [(dt.date.today() - dt.timedelta(days=n)).isoformat() for n in (3, 2)]
    api.wait_for_dag("hparam_sweep")
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "airflow"), "backfill", "create", "--dag-id", "hparam_sweep",
         "--from-date", days[0], "--to-date", days[1], "--dag-run-conf", json.dumps(conf),
         "--reprocess-behavior", "completed"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **airflow_env()},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = api.get("/dags/hparam_sweep/dagRuns?run_type=backfill&limit=50")["dag_runs"]
    ours = {r["logical_date"][:10]: r for r in runs if r["conf"] == conf}
    assert sorted(ours) == days
    states = [api.wait_for_run("hparam_sweep", r["dag_run_id"], timeout=900)["state"] for r in ours.values()]
    assert states == ["success", "success"]
    # Each logical date trained on its own data window: the campaign days up to that date.
    for day, run in ours.items():
        command = api.xcom("hparam_sweep", run["dag_run_id"], "job_spec")["command"]
        assert f'"$lte": "{day}"' in command
