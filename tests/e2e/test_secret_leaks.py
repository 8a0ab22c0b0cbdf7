"""One secrets path, end to end: a real training job that prints every secret it holds.

The e2e_secrets DAG (tests/e2e/dags/secrets_probe.py) runs the pipeline's image, train,
register and catalog steps under the docker runtime, with three real secrets: the MLflow
password (mlflow_default), a Mongo URI with a password (a connection this test creates) and the
registry password (registry_default, staged for the pull). Its job prints them all, in the batch
shell and in the container. Then every place a value could leak is read back:

* the argv of every process on the node (``ps -eo args``) while the docker job runs;
* the job's secrets file: mode 600 while the job runs, gone once it is over;
* the staged sbatch script; the task logs and the trigger log (the values show as ``***``);
* every XCom of the run, the train task's rendered template fields (REST API);
* the MLflow run's params, tags and the script it keeps; the run's catalog document in Mongo.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from urllib.parse import quote_plus

import pytest

from scripts.airflow_api import AirflowAPIError
from tests.e2e.helpers import trigger_logs

pytestmark = pytest.mark.e2e

DAG = "e2e_secrets"
MONGO_CONN = "e2e_secrets_mongo"
CONF = {"task": "deepcam", "max_epochs": 1, "width": 4, "batch_size": 64, "model_name": "e2e-secrets"}


@pytest.fixture(scope="module")
def mongo_password(api):
    """A job-side Mongo connection with a password full of URL specials (quoted in the URI)."""
    password = f"Mg-{secrets.token_hex(8)}/+@:x"
    conn = {"connection_id": MONGO_CONN, "conn_type": "mongo", "host": "127.0.0.1", "port": 27017,
            "schema": "campaigns", "login": "probe", "password": password,
            "extra": json.dumps({"srv": False, "ssl": False})}
    try:
        api.delete(f"/connections/{MONGO_CONN}")  # left over by an interrupted run
    except AirflowAPIError as exc:
        if exc.status != 404:
            raise
    api.post("/connections", conn)
    yield password
    api.delete(f"/connections/{MONGO_CONN}")


def ps_args() -> str:
    """Every process's full argv ("ww": unlimited width; ps cuts lines to $COLUMNS otherwise)."""
    return subprocess.run(["ps", "-e", "-ww", "-o", "args"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def probed(api, cluster, mongo_password):
    """Run the DAG; while its job runs, sample every argv on the node and the secrets file's mode."""
    api.wait_for_dag(DAG)
    run_id = api.trigger(DAG, conf=CONF)["dag_run_id"]
    ti_path = f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train"
    samples, modes, job = [], set(), None
    started = time.monotonic()
    while time.monotonic() - started < 600:
        samples.append(ps_args())
        if job is None and api.get(ti_path)["state"] in {"deferred", "running"}:
            try:
                job = api.xcom(DAG, run_id, "train", key="slurm_job")
            except AirflowAPIError:
                pass
        if job is not None:
            modes.add(cluster(f"stat -c %a {job['secrets_path']} 2>/dev/null || echo gone").strip())
        if api.get(f"/dags/{DAG}/dagRuns/{run_id}")["state"] in {"success", "failed"}:
            break
        time.sleep(0.5)
    run = api.get(f"/dags/{DAG}/dagRuns/{run_id}")
    states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG, run_id)}
    return {"run": run, "states": states, "samples": samples, "modes": modes, "job": job,
            "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def values(stack_env, mongo_password):
    """Every form of every secret the job held: none of them may appear anywhere below."""
    registry_token = base64.b64encode(
        f"{stack_env['REGISTRY_USER']}:{stack_env['REGISTRY_PASSWORD']}".encode()).decode()
    return {"mlflow password": stack_env["MLFLOW_TRACKING_PASSWORD"], "mongo password": mongo_password,
            "mongo password (quoted)": quote_plus(mongo_password),
            "registry password": stack_env["REGISTRY_PASSWORD"], "registry token": registry_token}


def leaks(text: str, values: dict[str, str]) -> list[str]:
    return [what for what, value in values.items() if value in text]


def test_the_job_ran_under_docker_with_no_secret_on_any_command_line(probed, values):
    assert probed["run"]["state"] == "success", probed["states"]
    job_id = probed["job"]["job_id"]
    docker = [s for s in probed["samples"] if f"slurmflow.slurm_job_id={job_id}" in s and "-e MONGO_URI" in s]
    print(f"e2e_secrets run: {probed['seconds']:.0f} s, {len(probed['samples'])} ps samples, "
          f"{len(docker)} during the docker run")
    assert docker, "no sample caught the job's docker run"
    assert any("probe container MONGO_URI=$MONGO_URI" in s for s in docker)  # the names, unexpanded
    for sample in probed["samples"]:
        assert leaks(sample, values) == []


def test_the_secrets_file_was_private_and_is_gone(probed, cluster):
    assert "600" in probed["modes"], probed["modes"]
    assert probed["modes"] <= {"600", "gone"}
    path = probed["job"]["secrets_path"]
    assert cluster(f"test -e {path} && echo present || echo gone").strip() == "gone"


def test_the_script_names_the_secrets_file_and_holds_no_value(probed, cluster, values):
    script = cluster(f"cat {probed['job']['script_path']}")
    assert f". {probed['job']['secrets_path']}" in script
    assert leaks(script, values) == []


def test_logs_show_stars_where_the_job_printed_secrets(probed, api, values):
    run_id, job_id = probed["run"]["dag_run_id"], probed["job"]["job_id"]
    log = api.task_log(DAG, run_id, "train")
    # the job's own lines, streamed by the trigger into the task log
    assert f"[slurm {job_id}] probe batch MONGO_URI=*** MLFLOW_TRACKING_PASSWORD=***" in log
    assert f"[slurm {job_id}] probe container MONGO_URI=*** MLFLOW_TRACKING_PASSWORD=***" in log
    assert f"[slurm {job_id}] probe batch registry CH_IMAGE_PASSWORD=***" in log
    assert '"auth": "***"' in log
    for task in probed["states"]:
        assert leaks(api.task_log(DAG, run_id, task), values) == [], task
    # the triggerer's own file (the trigger masked the values there itself)
    files = trigger_logs(DAG, run_id, "train")
    assert files, "no trigger log"
    text = "".join(p.read_text() for p in files)
    assert "probe container MONGO_URI=***" in text and leaks(text, values) == []


def test_xcom_and_rendered_fields_hold_no_value(probed, api, values):
    run_id = probed["run"]["dag_run_id"]
    entries = api.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/~/xcomEntries?limit=100")["xcom_entries"]
    assert {"train", "register", "catalog"} <= {e["task_id"] for e in entries}
    for entry in entries:
        value = api.xcom(DAG, run_id, entry["task_id"], key=entry["key"], map_index=entry["map_index"])
        assert leaks(json.dumps(value), values) == [], entry
    ti = api.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train")
    rendered = json.dumps(ti["rendered_fields"])
    assert "sbatch_script" in ti["rendered_fields"] and leaks(rendered, values) == []


def test_mlflow_and_the_catalog_hold_no_value(probed, api, mlflow_client, catalog_db, values):
    run_id = probed["run"]["dag_run_id"]
    reg = api.xcom(DAG, run_id, "register")
    mlrun = mlflow_client.get_run(reg["run_id"])
    assert mlrun.data.tags["slurm.job_id"] == str(probed["job"]["job_id"])
    assert leaks(json.dumps({"params": mlrun.data.params, "tags": mlrun.data.tags}), values) == []
    assert leaks(open(mlflow_client.download_artifacts(reg["run_id"], "slurm/job.sh")).read(), values) == []
    doc = catalog_db["runs"].find_one({"run_key": probed["job"]["run_key"]}, {"_id": 0})
    assert doc["state"] == "registered"
    assert leaks(json.dumps(doc, default=str), values) == []
