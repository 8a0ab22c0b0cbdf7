"""nightly_retrain and hparam_sweep end to end on the local stack, through the REST API and CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

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


@pytest.fixture
def max_array_size(api):
    """The site's cap on array jobs (Variable ``slurmflow_max_array_size``), removed afterwards."""

    def cap(size: int) -> None:
        api.post("/variables", {"key": "slurmflow_max_array_size", "value": str(size)})

    yield cap
    try:
        api.delete("/variables/slurmflow_max_array_size")
    except Exception:  # never set
        pass


def test_a_sweep_over_max_array_size_runs_as_pieces_throttled_as_one(run_dag, api, mlflow_client, catalog_db,
                                                                     cluster, max_array_size):
    """5 trials with arrays capped at 3: two array jobs (3 + 2), one after another, never more than
    max_parallel=2 trials at once; every trial logged once under the summary run, the best registered."""
    max_array_size(3)
    model = f"e2e-sweep-{uuid.uuid4().hex[:6]}"
    conf = {"model_name": model, "search_space": {"lr": [0.001, 0.003, 0.01, 0.03, 0.1]}, "max_epochs": 1,
            "max_parallel": 2}
    run, states = run_dag("hparam_sweep", conf)
    assert run["state"] == "success", states
    rid = run["dag_run_id"]
    spec = api.xcom("hparam_sweep", rid, "job_spec")
    assert [p["sbatch_options"]["array"] for p in spec] == ["0-2%2", "0-1%2"]
    pieces = [api.xcom("hparam_sweep", rid, "train", map_index=i) for i in (0, 1)]
    assert [p["array"]["counts"] for p in pieces] == [{"COMPLETED": 3}, {"COMPLETED": 2}]
    assert [p["identity"]["map_index"] for p in pieces] == [0, 1]
    # sacct: each trial ran once, the pieces one after another, at most 2 trials at a time
    ids = ",".join(str(p["job_id"]) for p in pieces)
    rows = [line.split("|") for line in cluster(f"sacct -n -P -X -j {ids} -o JobID,State,Start,End").split()]
    assert sorted(r[0] for r in rows) == sorted(f"{p['job_id']}_{t}" for p, n in zip(pieces, (3, 2), strict=True) for t in range(n))
    assert all(r[1] == "COMPLETED" for r in rows)
    times = [(dt.datetime.fromisoformat(r[2]), dt.datetime.fromisoformat(r[3])) for r in rows]
    assert max(sum(s <= t < e for s, e in times) for t, _ in times) <= 2
    first_piece_end = max(e for (r, (s, e)) in zip(rows, times, strict=True) if r[0].startswith(f"{pieces[0]['job_id']}_"))
    assert all(s >= first_piece_end for (r, (s, e)) in zip(rows, times, strict=True) if r[0].startswith(f"{pieces[1]['job_id']}_"))

    sweep = api.xcom("hparam_sweep", rid, "register")
    assert len(sweep["trials"]) == 5 and len({t["run_id"] for t in sweep["trials"]}) == 5
    assert sweep["failed_trials"] == 0 and sweep["too_many_failed"] is False
    assert sweep["sweep_key"] == f"hparam_sweep/{rid}/train/-1/g0"
    best = min(sweep["trials"], key=lambda t: t["metrics"][sweep["metric"]])
    assert sweep["best"]["trial"] == best["trial"]
    assert [v.run_id for v in mlflow_client.search_model_versions(f"name = '{model}'")] == [best["run_id"]]
    summary = mlflow_client.get_run(sweep["summary_run_id"])
    assert summary.data.metrics["sweep/trials"] == 5 and summary.data.metrics["sweep/failed_trials"] == 0
    plots = [a.path for a in mlflow_client.list_artifacts(sweep["summary_run_id"], "plots")]
    assert plots == ["plots/metric_vs_hyperparameters.png"]
    assert [a.path for a in mlflow_client.list_artifacts(sweep["summary_run_id"], "slurm")] == [
        "slurm/piece-0.sh", "slurm/piece-1.sh"]
    manifests = Path(mlflow_client.download_artifacts(sweep["summary_run_id"], "sweep/manifests.jsonl",
                                                      tempfile.mkdtemp())).read_text().splitlines()
    assert sorted(json.loads(line)["trial"] for line in manifests) == list(range(5))
    assert all(json.loads(line)["manifest"]["status"] == "completed" for line in manifests)
    for trial in sweep["trials"]:
        tags = mlflow_client.get_run(trial["run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == sweep["summary_run_id"]
        assert tags["slurmflow.run_key"] == f"{sweep['sweep_key']}/trial-{trial['trial']}"
    doc = catalog_db["sweeps"].find_one({"sweep_key": sweep["sweep_key"]})
    assert len(doc["trials"]) == 5 and doc["best_trial"] == best["trial"] and doc["failed_trials"] == []
    # the best trial's registered version is an MLflow Model too
    version = mlflow_client.search_model_versions(f"name = '{model}'")[0]
    assert "model/MLmodel" in [a.path for a in mlflow_client.list_artifacts(version.run_id, "model")]


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
        command = api.xcom("hparam_sweep", run["dag_run_id"], "job_spec")[0]["command"]
        assert f'"$lte": "{day}"' in command
