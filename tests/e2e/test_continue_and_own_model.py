"""Continue a previous experiment and train your own model, through train_model on the local stack.

* a run continued from a model version trains only the remaining epochs, from the parent's
  checkpoint copied into its own job directory, and links its parent (MLflow run, model version,
  catalog); a max_epochs the parent already reached fails at preflight;
* the ECG example (training/configs/ecg.yaml, no code outside training/) trains through train_model;
* a bad config key in ``overrides`` fails at preflight, once, with no job submitted.
"""

from __future__ import annotations

import json
import shlex
import uuid

import pytest

pytestmark = pytest.mark.e2e

PARENT_TAG = "slurmflow.parent_run_id"


def _result(mlflow_client, run_id: str, tmp_path) -> dict:
    return json.loads(open(mlflow_client.download_artifacts(run_id, "result/result.json", str(tmp_path))).read())


def _jobs_seen(cluster) -> str:
    return cluster("squeue -h -o %i | wc -l; sacct -n -X -S now-10minutes -o jobid | wc -l")


@pytest.fixture(scope="module")
def parent(run_dag, api):
    """A 2-epoch surrogate registered as version 1 of a fresh model."""
    model = f"e2e-continue-{uuid.uuid4().hex[:6]}"
    run, states = run_dag("train_model", {"model_name": model, "max_epochs": 2})
    assert run["state"] == "success", states
    return model, api.xcom("train_model", run["dag_run_id"], "register"), api.xcom("train_model", run["dag_run_id"],
                                                                                   "train")


def test_continue_from_a_version_trains_only_the_remaining_epochs_and_links_its_parent(
        parent, run_dag, api, cluster, mlflow_client, catalog_db, tmp_path):
    model, first, first_job = parent
    run, states = run_dag("train_model", {"model_name": model, "max_epochs": 4, "init_from": f"models:/{model}/1"})
    assert run["state"] == "success", states
    rid = run["dag_run_id"]
    reg, job = api.xcom("train_model", rid, "register"), api.xcom("train_model", rid, "train")
    assert reg["model_version"] == "2" and reg["run_id"] != first["run_id"]

    parent_result, result = _result(mlflow_client, first["run_id"], tmp_path / "p"), \
        _result(mlflow_client, reg["run_id"], tmp_path / "c")
    steps = parent_result["training"]["global_step"]
    assert parent_result["training"]["epochs_completed"] == 2
    # epochs 3 and 4 only, from the parent's state (optimizer and scheduler came with it)
    assert result["training"]["epochs_completed"] == 4
    assert result["training"]["attempts"][0]["start_step"] == steps
    assert result["training"]["global_step"] == 2 * steps
    assert result["training"]["resumed_from"] == "init/parent.ckpt"
    assert result["training"]["init_from"]["mode"] == "resume"
    assert [row["epoch"] for row in result["metrics"]["history"]] == [0, 1, 2, 3]

    # lineage: the run, the model version and the catalog name the parent
    tags = mlflow_client.get_run(reg["run_id"]).data.tags
    assert tags[PARENT_TAG] == first["run_id"] and tags["slurmflow.init_from"] == f"models:/{model}/1"
    assert tags["slurmflow.init_mode"] == "resume" and "mlflow.parentRunId" not in tags
    assert mlflow_client.get_model_version(model, "2").tags[PARENT_TAG] == first["run_id"]
    doc = catalog_db["runs"].find_one({"run_key": job["run_key"]})
    assert doc["parent"]["run_id"] == first["run_id"] and doc["parent"]["model_version"] == "1"
    assert doc["parent"]["source"] == "cluster"

    # the checkpoint came from the parent's job directory, which is left intact
    parent_ckpt = f"{first_job['job_dir']}/checkpoints/last.ckpt"
    assert cluster(f"cmp {shlex.quote(parent_ckpt)} {shlex.quote(job['job_dir'])}/init/parent.ckpt && echo same") \
        .strip() == "same"


def test_a_max_epochs_the_parent_already_reached_fails_at_preflight(parent, run_dag, api, cluster):
    model, _, _ = parent
    before = _jobs_seen(cluster)
    run, states = run_dag("train_model", {"model_name": model, "max_epochs": 2, "init_from": f"models:/{model}/1"})
    assert run["state"] == "failed"
    assert states["preflight"] == "failed" and states["train"] == "upstream_failed", states
    log = api.task_log("train_model", run["dag_run_id"], "preflight")
    assert "max_epochs=2 is already reached" in log and "trained 2 epoch(s)" in log
    assert _jobs_seen(cluster) == before


def test_the_example_model_trains_through_train_model(run_dag, api, mlflow_client):
    model = f"e2e-ecg-{uuid.uuid4().hex[:6]}"
    run, states = run_dag("train_model", {
        "model_name": model, "config": "ecg", "max_epochs": 2,
        "overrides": ["--data.num_samples=256", "--model.width=8", "--model.depth=3"],
    })
    assert run["state"] == "success", states
    reg = api.xcom("train_model", run["dag_run_id"], "register")
    assert reg["model_name"] == model and reg["model_version"] == "1"
    assert 0.0 <= reg["metrics"]["val/accuracy"] <= 1.0 and "val/f1" in reg["metrics"]
    mlrun = mlflow_client.get_run(reg["run_id"])
    assert mlrun.data.tags["hpctrain.task"] == "hpctrain.tasks.ecg.ECGClassifier"
    assert mlrun.data.params["model.width"] == "8"  # the override reached the job
    # the config travelled in the job script, not in the image
    script = open(mlflow_client.download_artifacts(reg["run_id"], "slurm/job.sh")).read()
    assert "class_path: hpctrain.tasks.ecg.ECGClassifier" in script and "--config experiment.yaml" in script


def test_a_bad_config_key_fails_at_preflight_once_with_no_job(run_dag, api, cluster):
    before = _jobs_seen(cluster)
    run, states = run_dag("train_model", {"config": "ecg", "overrides": ["--model.widht=8"]})
    assert run["state"] == "failed"
    assert states["preflight"] == "failed", states
    assert states["build_image"] == "upstream_failed" and states["train"] == "upstream_failed", states
    tries = {t["task_id"]: t["try_number"] for t in api.task_instances("train_model", run["dag_run_id"])}
    assert tries["preflight"] == 1  # refused input: no retry
    log = api.task_log("train_model", run["dag_run_id"], "preflight")
    assert "refused by hpctrain's parser" in log and "widht" in log
    assert _jobs_seen(cluster) == before
