"""train_model end to end on the local stack, through Airflow's REST API."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from scripts.airflow_api import AirflowAPIError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(run_dag):
    model = f"e2e-train-{uuid.uuid4().hex[:6]}"
    run, states = run_dag("train_model", {"model_name": model, "max_epochs": 2})
    return run, states, model


def test_defaults_train_register_and_catalog(trained, api, mlflow_client, catalog_db):
    run, states, model = trained
    assert run["state"] == "success", states
    assert set(states.values()) == {"success"}
    job = api.xcom("train_model", run["dag_run_id"], "train")
    assert job["state"] == "COMPLETED" and job["exit_code"] == 0
    reg = api.xcom("train_model", run["dag_run_id"], "register")
    assert reg["model_name"] == model and reg["model_version"] == "1"
    assert reg["metrics"]["val/loss"] > 0
    mlrun = mlflow_client.get_run(reg["run_id"])
    assert mlrun.data.tags["slurm.job_id"] == str(job["job_id"])
    assert mlrun.data.tags["image"].split("@")[1].startswith("sha256:")
    assert "#SBATCH" in open(mlflow_client.download_artifacts(reg["run_id"], "slurm/job.sh")).read()
    assert mlrun.data.tags["slurmflow.run_key"] == job["run_key"] == f"train_model/{run['dag_run_id']}/train/-1/g0"
    # the code version: the checkout's git SHA (+ -dirty) and the image's content tag
    version = mlflow_client.get_model_version(model, "1")
    assert mlrun.data.tags["code_version"] != "unknown"
    assert mlrun.data.tags["code.git_sha"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert version.tags["code_version"] == mlrun.data.tags["code_version"]
    assert version.tags["image.content_tag"] == api.xcom("train_model", run["dag_run_id"], "build_image", key="tag")
    doc = catalog_db["runs"].find_one({"run_key": job["run_key"]})
    assert [h["state"] for h in doc["history"]] == ["submitted", "completed", "registered"]
    assert doc["mlflow"]["model_version"] == "1" and doc["slurm"]["job_id"] == job["job_id"]
    assert doc["code"]["code_version"] == mlrun.data.tags["code_version"] and doc["generation"] == 0
    # what the job used, measured by sacct, on the run, the model version and the catalog document
    assert int(mlrun.data.tags["slurm.alloc_cpus"]) >= 1 and float(mlrun.data.tags["slurm.gpu_hours"]) == 0
    assert float(mlrun.data.tags["slurm.total_cpu_seconds"]) >= 0 and "slurm.cpu_efficiency" in mlrun.data.tags
    assert version.tags["slurm.alloc_cpus"] == mlrun.data.tags["slurm.alloc_cpus"]
    assert doc["usage"]["job_id"] == str(job["job_id"]) and doc["usage"]["elapsed_seconds"] > 0
    # no GitPython noise in the job's own log (mlflow imports git inside a container without it)
    log = api.task_log("train_model", run["dag_run_id"], "train")
    assert "Bad git executable" not in log and "GIT_PYTHON" not in log


def test_rerunning_registration_does_not_duplicate(trained, api, mlflow_client, catalog_db):
    run, _, model = trained
    run_id = run["dag_run_id"]
    api.post("/dags/train_model/clearTaskInstances",
             {"dry_run": False, "only_failed": False, "task_ids": ["register", "catalog"], "dag_run_id": run_id,
              "reset_dag_runs": True})
    again = api.wait_for_run("train_model", run_id, timeout=300)
    assert again["state"] == "success"
    tries = {t["task_id"]: t["try_number"] for t in api.task_instances("train_model", run_id)}
    assert tries["register"] == 2 and tries["train"] == 1, tries  # the clear really re-ran register only
    versions = mlflow_client.search_model_versions(f"name = '{model}'")
    assert [v.version for v in versions] == ["1"]
    assert catalog_db["runs"].count_documents({"run_key": f"train_model/{run_id}/train/-1/g0"}) == 1
    reg = api.xcom("train_model", run_id, "register")
    assert reg["model_version"] == "1"


def test_clearing_train_retrains_and_registers_a_new_version(trained, api, mlflow_client, catalog_db):
    """A clear of train is a new generation: new job, new MLflow run, new model version; the old
    version and its run are left exactly as they were."""
    run, _, model = trained
    run_id = run["dag_run_id"]
    first_job = api.xcom("train_model", run_id, "train")
    first = api.xcom("train_model", run_id, "register")
    old_run = mlflow_client.get_run(first["run_id"])
    api.post("/dags/train_model/clearTaskInstances",
             {"dry_run": False, "only_failed": False, "task_ids": ["train"], "include_downstream": True, "dag_run_id": run_id,
              "reset_dag_runs": True})
    again = api.wait_for_run("train_model", run_id, timeout=600)
    assert again["state"] == "success"
    job = api.xcom("train_model", run_id, "train")
    reg = api.xcom("train_model", run_id, "register")
    assert job["generation"] == 1 and job["job_id"] != first_job["job_id"]
    assert reg["model_version"] == "2" and reg["run_id"] != first["run_id"]
    assert sorted(v.version for v in mlflow_client.search_model_versions(f"name = '{model}'")) == ["1", "2"]
    new_run = mlflow_client.get_run(reg["run_id"])
    assert new_run.data.tags["slurm.job_id"] == str(job["job_id"])
    assert new_run.data.tags["slurmflow.run_key"].endswith("/g1")
    # the old run is untouched: same job id, same metrics, no tags of the new training
    untouched = mlflow_client.get_run(first["run_id"])
    assert untouched.data.tags["slurm.job_id"] == str(first_job["job_id"])
    assert untouched.data.metrics == old_run.data.metrics
    assert mlflow_client.get_model_version(model, "1").run_id == first["run_id"]
    docs = {d["generation"]: d for d in catalog_db["runs"].find({"dag_id": "train_model", "run_id": run_id})}
    assert set(docs) == {0, 1}
    assert docs[0]["slurm"]["job_id"] == first_job["job_id"] and docs[1]["slurm"]["job_id"] == job["job_id"]
    assert docs[1]["mlflow"]["model_version"] == "2" and docs[0]["mlflow"]["model_version"] == "1"


@pytest.mark.parametrize("conf, reason", [
    ({"lr": -1}, "lr"),
    ({"partition": "debug; touch /tmp/pwned"}, "partition"),
    ({"task": "gpt5"}, "task"),
    ({"time_limit": "forever"}, "time_limit"),
    ({"data_query": {"$where": "sleep(100000)"}}, "$where"),  # server-side JavaScript
    ({"data_query": {"day": {"$lte": 3}, "$or": [{"x": {"$function": {}}}]}}, "$function"),
    ({"data_query": {"$expr": {"$gt": ["$a", 1]}}}, "$expr"),
])
def test_invalid_params_are_rejected_before_slurm(api, cluster, conf, reason):
    api.wait_for_dag("train_model")
    before = api.get("/dags/train_model/dagRuns?limit=1")["total_entries"]
    since = cluster("date +%Y-%m-%dT%H:%M:%S").strip()  # a fixed start, not a sliding window
    with pytest.raises(AirflowAPIError) as err:
        api.trigger("train_model", conf=conf)
    assert err.value.status == 400, err.value
    assert reason in str(err.value.detail)
    assert api.get("/dags/train_model/dagRuns?limit=1")["total_entries"] == before
    submitted = cluster(f"sacct -n -X -P -S {since} -o jobid,submit").split()
    assert [row for row in submitted if row.split("|")[-1] >= since] == [], "nothing was submitted"


def test_registered_version_is_an_mlflow_model(trained, api, mlflow_client, stack_env, monkeypatch):
    """MLflow's own loaders read what a real run registered: pyfunc on a DataFrame of the feature
    columns, the pytorch flavour on a tensor, by alias like a serving client would."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pymongo
    import torch

    run, _, model = trained
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack_env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack_env["MLFLOW_TRACKING_PASSWORD"])
    mlflow.set_tracking_uri(stack_env["MLFLOW_TRACKING_URI"])
    mlflow_client.set_registered_model_alias(model, "champion", "1")
    features = api.xcom("train_model", run["dag_run_id"], "register")["data_spec"]["init_args"]["features"]

    pyfunc = mlflow.pyfunc.load_model(f"models:/{model}@champion")
    assert pyfunc.metadata.get_input_schema().input_names() == features
    docs = list(pymongo.MongoClient(stack_env["MONGO_URI"])["campaigns"]["borehole"].find({}, {"_id": 0}).limit(8))
    frame = pd.DataFrame(docs)[features]
    predicted = np.asarray(pyfunc.predict(frame)).reshape(len(frame), -1)
    native = mlflow.pytorch.load_model(f"models:/{model}/1")
    expected = native(torch.tensor(frame.to_numpy(np.float32))).detach().numpy()
    assert np.allclose(predicted, expected, atol=1e-5) and np.isfinite(predicted).all()


def test_registered_version_serves_predictions_over_http(trained, api, stack_env):
    """``mlflow models serve --env-manager local`` on the registered version answers /invocations."""
    import json
    import os
    import socket
    import sys
    import time
    import urllib.request
    from pathlib import Path

    _, _, model = trained
    run_features = api.xcom("train_model", trained[0]["dag_run_id"], "register")["data_spec"]
    features = run_features["init_args"]["features"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = str(Path(sys.executable).parent)  # uvicorn, which the server execs, lives there
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": stack_env["MLFLOW_TRACKING_URI"],
           "MLFLOW_TRACKING_USERNAME": stack_env["MLFLOW_TRACKING_USERNAME"],
           "MLFLOW_TRACKING_PASSWORD": stack_env["MLFLOW_TRACKING_PASSWORD"]}
    server = subprocess.Popen([f"{venv_bin}/mlflow", "models", "serve", "-m", f"models:/{model}/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "mlflow models serve did not come up in 180 s"
                time.sleep(1)
        body = {"dataframe_split": {"columns": features, "data": [[1.0] * len(features), [2.0] * len(features)]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert len(answer["predictions"]) == 2
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
