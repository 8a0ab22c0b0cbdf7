"""MLflow: live logging when the server answers, offline store + upload when it does not.

Against the real MLflow server of the local stack (``make up``), with its basic-auth credentials.
"""

from __future__ import annotations

import uuid

import pytest
from hpctrain_testing import SURROGATE_TINY

from hpctrain.manifest import load_manifest
from hpctrain.offline import COMPLETE_TAG, OFFLINE_RUN_TAG, upload
from hpctrain.tracking import probe

pytestmark = pytest.mark.integration


@pytest.fixture
def mlflow_client(stack_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack_env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack_env["MLFLOW_TRACKING_PASSWORD"])
    return MlflowClient(stack_env["MLFLOW_TRACKING_URI"])


def test_probe_distinguishes_usable_unreachable_and_unauthorized(stack_env):
    uri = stack_env["MLFLOW_TRACKING_URI"]
    user, password = stack_env["MLFLOW_TRACKING_USERNAME"], stack_env["MLFLOW_TRACKING_PASSWORD"]
    assert probe(uri, username=user, password=password)[0] is True
    ok, why = probe(uri, username=user, password="wrong")
    assert not ok and "401" in why
    ok, why = probe("http://127.0.0.1:9", timeout=1.0)
    assert not ok and "unreachable" in why


def test_offline_run_uploads_once(hpctrain, borehole_csv, tmp_path, stack_env, mlflow_client, monkeypatch):
    # The compute node's view: MLFLOW_TRACKING_URI is set but nothing answers there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    job = tmp_path / "job"
    experiment = f"hpctrain-offline-{uuid.uuid4().hex[:8]}"
    assert (
        hpctrain(
            "fit",
            *SURROGATE_TINY,
            f"--data.path={borehole_csv}",
            "--trainer.log_every_n_steps=1",
            f"--run.experiment={experiment}",
            "--run.probe_timeout=1",
            f"--run.job_dir={job}",
        )
        == 0
    )
    m = load_manifest(job)
    assert m["mlflow"]["mode"] == "offline" and "unreachable" in m["mlflow"]["reason"]
    offline_id = m["mlflow"]["run_id"]

    # The orchestrator's view: the server is reachable from here.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    run_id = upload(job, stack_env["MLFLOW_TRACKING_URI"])
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[OFFLINE_RUN_TAG] == offline_id and run.data.tags[COMPLETE_TAG] == "true"
    assert mlflow_client.get_experiment(run.info.experiment_id).name == experiment
    assert run.data.params["lr"] == "0.003" and run.data.params["in_features"] == "8"

    history = mlflow_client.get_metric_history(run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert len(steps) == m["training"]["global_step"] and steps == list(
        range(steps[0], steps[0] + len(steps))
    )
    val = mlflow_client.get_metric_history(run_id, "val/loss")
    assert [round(v.value, 6) for v in sorted(val, key=lambda v: v.step)] == [
        round(row["val/loss"], 6) for row in m["metrics"]["history"]
    ]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run_id)}
    assert {"result.json", "config.yaml", "model"} <= artifacts
    assert "model/model.pt" in {a.path for a in mlflow_client.list_artifacts(run_id, "model")}

    # idempotent: a second upload (a retried Airflow task) finds the first one
    assert upload(job, stack_env["MLFLOW_TRACKING_URI"]) == run_id
    found = mlflow_client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{OFFLINE_RUN_TAG}` = '{offline_id}'"
    )
    assert [r.info.run_id for r in found] == [run_id]


def test_online_run_logs_live(hpctrain, borehole_csv, tmp_path, stack_env, mlflow_client, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack_env["MLFLOW_TRACKING_URI"])
    job = tmp_path / "job"
    experiment = f"hpctrain-online-{uuid.uuid4().hex[:8]}"
    assert (
        hpctrain(
            "fit",
            *SURROGATE_TINY,
            f"--data.path={borehole_csv}",
            f"--run.experiment={experiment}",
            "--trainer.max_epochs=1",
            f"--run.job_dir={job}",
            "--run.tags={team: climate}",
        )
        == 0
    )
    m = load_manifest(job)
    assert m["mlflow"]["mode"] == "online" and m["mlflow"]["tracking_uri"] == stack_env["MLFLOW_TRACKING_URI"]
    assert not (job / "mlruns-offline").exists()
    run = mlflow_client.get_run(m["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "climate"
    assert run.data.metrics["val/loss"] == pytest.approx(m["metrics"]["final"]["val/loss"])
    assert "result.json" in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
