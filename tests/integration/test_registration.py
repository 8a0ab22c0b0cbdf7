"""MLflow registration and the Mongo run catalog against the real servers: idempotent by run key."""

from __future__ import annotations

import uuid

import pytest

from slurmflow.hooks.catalog import RunCatalogHook
from slurmflow.hooks.mlflow import MlflowHook

pytestmark = pytest.mark.integration


def test_log_and_register_twice_gives_one_run_and_one_version(stack_connections, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    hook = MlflowHook()
    key = f"train_model/{uuid.uuid4().hex}/train/-1"
    name = f"test-model-{uuid.uuid4().hex[:6]}"
    ids, versions = set(), set()
    for _ in range(2):  # a retried registration task
        rid = hook.log_training(experiment="test-registration", run_key=key, run_name="t",
                                params={"lr": 0.01}, metrics={"val/loss": 0.25},
                                tags={"slurm.job_id": "42"}, artifacts={"model": model})
        ids.add(rid)
        versions.add(hook.register_model(name, rid, "model", {"slurm.job_id": "42"}))
    assert len(ids) == 1 and versions == {"1"}
    run = hook.client.get_run(ids.pop())
    assert run.data.metrics["val/loss"] == 0.25 and run.data.tags["slurm.job_id"] == "42"
    assert [a.path for a in hook.client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    hook.set_alias(name, "champion", "1")
    assert hook.version_by_alias(name, "champion").version == "1"
    assert hook.version_by_alias(name, "nope") is None


def test_catalog_upserts_and_keeps_history(stack_connections):
    catalog = RunCatalogHook(database=f"catalog_{uuid.uuid4().hex[:6]}")
    key = "train_model/manual__1/train/-1"
    catalog.record_run(key, "submitted", {"slurm": {"job_id": "7"}})
    catalog.record_run(key, "submitted", {"slurm": {"job_id": "7"}})  # retried: no duplicate entry
    doc = catalog.record_run(key, "registered", {"mlflow": {"run_id": "abc", "model_version": "1"}})
    assert [h["state"] for h in doc["history"]] == ["submitted", "registered"]
    assert doc["slurm"]["job_id"] == "7" and doc["mlflow"]["model_version"] == "1"
    assert catalog.db["runs"].count_documents({"run_key": key}) == 1
    catalog.hook.get_conn().drop_database(catalog.db.name)


def test_reading_the_champion_on_doubt_raises_instead_of_meaning_none(stack_connections, stack_env, monkeypatch):
    """Promotion never on doubt: only MLflow's "no such alias / model" reads as "no champion";
    a refused login (or any other error) raises, so the promote task fails and retries."""
    import json

    from mlflow.exceptions import MlflowException

    hook = MlflowHook()
    name = f"test-model-{uuid.uuid4().hex[:6]}"
    assert hook.version_by_alias(name, "champion") is None  # no such model
    hook.client.create_registered_model(name)
    assert hook.version_by_alias(name, "champion") is None  # model without that alias
    # The hook writes MLflow's credentials into the environment: let monkeypatch restore them.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack_env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack_env["MLFLOW_TRACKING_PASSWORD"])
    wrong = {**stack_connections["mlflow_default"], "password": "not-the-password"}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_WRONG", json.dumps(wrong))
    with pytest.raises(MlflowException, match="401|UNAUTHENTICATED|not authenticated"):
        MlflowHook("mlflow_wrong").version_by_alias(name, "champion")
