"""MLflow registration and the Mongo run catalog against the real servers: idempotent by run key."""

from __future__ import annotations

import os
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


def test_reading_the_champion_on_doubt_raises_instead_of_meaning_none(stack_connections, monkeypatch):
    """Promotion never on doubt: only MLflow's "no such alias / model" reads as "no champion";
    a refused login (or any other error) raises, so the promote task fails and retries."""
    import json

    from mlflow.exceptions import MlflowException

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)  # only the hooks' own logins may authenticate
    hook = MlflowHook()
    name = f"test-model-{uuid.uuid4().hex[:6]}"
    assert hook.version_by_alias(name, "champion") is None  # no such model
    hook.client.create_registered_model(name)
    assert hook.version_by_alias(name, "champion") is None  # model without that alias
    wrong = {**stack_connections["mlflow_default"], "password": "not-the-password"}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_WRONG", json.dumps(wrong))
    with pytest.raises(MlflowException, match="401|UNAUTHENTICATED|not authenticated"):
        MlflowHook("mlflow_wrong").version_by_alias(name, "champion")
    # Each hook's calls carry its own connection's login; none lands in the process environment.
    assert hook.version_by_alias(name, "champion") is None
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ


def test_a_run_without_its_mlflow_model_gets_it_from_the_job_directory(stack_connections, tmp_path):
    """The fallback of register: the training could not log model/ (upload failed mid-way), so
    Airflow copies the job's MLflow Model off the cluster over SFTP and logs it; MLflow's own
    loader then reads the run's model."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from hpctrain import mlflow_model
    from slurmflow.hooks.slurm import SlurmHook
    from slurmflow.pipeline.results import ResultMissingError, ensure_model_logged

    built = tmp_path / "built"
    mlflow_model.save(torch.nn.Linear(3, 1).eval(), built / "model", torch.ones(2, 3), feature_names=["a", "b", "c"])
    slurm = SlurmHook()
    job_dir = f"{slurm.job_root}/it_registration/{uuid.uuid4().hex}"
    files = sorted(p for p in (built / "model").rglob("*") if p.is_file())
    slurm.make_dirs(sorted({f"{job_dir}/model/{p.parent.relative_to(built / 'model')}" for p in files}))
    for p in files:
        slurm.upload(f"{job_dir}/model/{p.relative_to(built / 'model')}", p.read_bytes())

    hook = MlflowHook()
    run_id = hook.log_training(experiment="test-registration", run_key=f"it/{uuid.uuid4().hex}/train/-1/g0",
                               run_name="t", params={}, metrics={}, tags={})
    assert hook.client.list_artifacts(run_id, "model") == []
    ensure_model_logged(hook, run_id, slurm, job_dir, tmp_path / "copy")
    paths = {a.path for a in hook.client.list_artifacts(run_id, "model")}
    assert "model/MLmodel" in paths
    ensure_model_logged(hook, run_id, slurm, f"{job_dir}/gone", tmp_path / "again")  # present: nothing to do

    mlflow.set_tracking_uri(hook.tracking_uri)
    with hook.credentials():  # MLflow's own loader builds its own client
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    frame = pd.DataFrame(np.ones((2, 3)), columns=["a", "b", "c"])
    assert np.asarray(pyfunc.predict(frame)).shape == (2, 1)

    bare = hook.log_training(experiment="test-registration", run_key=f"it/{uuid.uuid4().hex}/train/-1/g0",
                             run_name="t", params={}, metrics={}, tags={})
    with pytest.raises(ResultMissingError, match="no model/ folder"):
        ensure_model_logged(hook, bare, slurm, f"{job_dir}/nothing-here", tmp_path / "bare")
    slurm.remove_tree(job_dir)
