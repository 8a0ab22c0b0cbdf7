"""One smoke test per service of the local stack, each against the real daemon."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
import uuid

import pytest

pytestmark = pytest.mark.integration


def ssh(env: dict[str, str], command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``command`` on the login node as the cluster user, the way the pipeline does."""
    return subprocess.run(
        ["ssh", "-i", env["SSH_KEY"], "-p", env["SSH_PORT"], "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         f"{env['SSH_USER']}@{env['SSH_HOST']}", command],
        capture_output=True, text=True, timeout=timeout,
    )


def test_ssh_login_runs_sinfo(stack_env):
    out = ssh(stack_env, "sinfo -h -o '%P %a %T'")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == [f"{stack_env['SLURM_PARTITION']}*", "up"]


def test_ssh_refuses_password_and_unknown_key(stack_env, tmp_path):
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out = ssh({**stack_env, "SSH_KEY": str(key)}, "true")
    assert out.returncode == 255 and "Permission denied" in out.stderr


def test_sbatch_job_completes_in_sacct(stack_env):
    out = ssh(stack_env, "cd ~ && sbatch --parsable --job-name=smoke --wrap 'echo hello from $SLURM_JOB_ID'")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        state = ssh(stack_env, f"sacct -n -X -P -j {job_id} -o State").stdout.strip()
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            break
        time.sleep(1)
    assert state == "COMPLETED"
    assert ssh(stack_env, f"cat ~/slurm-{job_id}.out").stdout.strip() == f"hello from {job_id}"


def test_jobs_run_concurrently(stack_env):
    ids = [ssh(stack_env, "cd ~ && sbatch --parsable --wrap 'sleep 120'").stdout.strip() for _ in range(3)]
    try:
        # Slurm may defer scheduling of batch jobs for a few seconds after submission
        # (batch_sched_delay, a busy slurmctld), so poll; the jobs outlive the deadline, so
        # seeing all three RUNNING at once still proves they share the node.
        deadline = time.monotonic() + 60
        while True:
            queue = ssh(stack_env, f"squeue -h -j {','.join(ids)} -o '%i %T %r'").stdout
            if [line.split()[1] for line in queue.splitlines()].count("RUNNING") == 3:
                break
            if time.monotonic() > deadline:
                everything = ssh(stack_env, "squeue -h -o '%i %T %r %C %j'").stdout
                pytest.fail(f"the three jobs never ran at once:\n{queue}\nwhole queue:\n{everything}")
            time.sleep(1)
    finally:
        ssh(stack_env, f"scancel {' '.join(ids)}")


def test_bad_account_is_rejected(stack_env):
    out = ssh(stack_env, "sbatch --account=no_such_account --wrap true")
    assert out.returncode != 0 and "Invalid account" in out.stderr


def _registry_get(env, path: str, accept: str | None = None):
    req = urllib.request.Request(f"http://{env['REGISTRY']}/v2/{path}")
    creds = base64.b64encode(f"{env['REGISTRY_USER']}:{env['REGISTRY_PASSWORD']}".encode()).decode()
    req.add_header("Authorization", f"Basic {creds}")
    if accept:
        req.add_header("Accept", accept)
    return urllib.request.urlopen(req, timeout=10)


def test_registry_push_pull_inspect(stack_env):
    import docker

    client = docker.from_env()
    client.login(stack_env["REGISTRY_USER"], stack_env["REGISTRY_PASSWORD"], registry=stack_env["REGISTRY"])
    repo = f"{stack_env['REGISTRY']}/smoke/base"
    tag = uuid.uuid4().hex[:8]
    client.images.get(stack_env["BASE_IMAGE"]).tag(repo, tag)
    client.images.push(repo, tag)
    client.images.remove(f"{repo}:{tag}")
    pulled = client.images.pull(repo, tag)
    with _registry_get(stack_env, f"smoke/base/manifests/{tag}",
                       "application/vnd.docker.distribution.manifest.v2+json") as resp:
        digest = resp.headers["Docker-Content-Digest"]
    assert digest.startswith("sha256:")
    assert f"{repo}@{digest}" in pulled.attrs["RepoDigests"]
    with _registry_get(stack_env, "smoke/base/tags/list") as resp:
        assert tag in json.load(resp)["tags"]


def test_registry_requires_credentials(stack_env):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{stack_env['REGISTRY']}/v2/_catalog", timeout=10)
    assert err.value.code == 401


def test_mlflow_health_and_log_run(stack_env, monkeypatch):
    import mlflow

    with urllib.request.urlopen(f"{stack_env['MLFLOW_TRACKING_URI']}/health", timeout=10) as resp:
        assert resp.status == 200
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack_env[key])
    client = mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("smoke") or client.get_experiment(client.create_experiment("smoke"))
    run = client.create_run(exp.experiment_id)
    client.log_metric(run.info.run_id, "val/loss", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["val/loss"] == 0.5


def test_mlflow_rejects_wrong_password(stack_env):
    req = urllib.request.Request(f"{stack_env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"admin:wrong").decode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


def test_mongo_insert_find_unique_index(stack_env):
    import pymongo
    from pymongo.errors import DuplicateKeyError

    client = pymongo.MongoClient(stack_env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    coll = client["smoke"][f"runs_{uuid.uuid4().hex[:8]}"]
    try:
        coll.create_index("run_key", unique=True)
        coll.insert_one({"run_key": "a", "state": "queued"})
        with pytest.raises(DuplicateKeyError):
            coll.insert_one({"run_key": "a", "state": "again"})
        coll.update_one({"run_key": "b"}, {"$set": {"state": "done"}}, upsert=True)
        assert coll.find_one({"run_key": "a"}, {"_id": 0}) == {"run_key": "a", "state": "queued"}
        assert coll.count_documents({}) == 2
    finally:
        coll.drop()
        client.close()


def test_airflow_api_health_and_settings_loaded(stack_env):
    with urllib.request.urlopen(f"{stack_env['AIRFLOW_URL']}/api/v2/monitor/health", timeout=10) as resp:
        health = json.load(resp)
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        assert health[component]["status"] == "healthy", health
    req = urllib.request.Request(
        f"{stack_env['AIRFLOW_URL']}/auth/token",
        data=json.dumps({"username": stack_env["AIRFLOW_USER"], "password": stack_env["AIRFLOW_PASSWORD"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        token = json.load(resp)["access_token"]
    req = urllib.request.Request(f"{stack_env['AIRFLOW_URL']}/api/v2/connections?limit=100",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        conns = {c["connection_id"]: c for c in json.load(resp)["connections"]}
    assert {"slurm_default", "registry_default", "mlflow_default", "mongo_default"} <= set(conns)
    # The API never hands secrets back.
    assert stack_env["REGISTRY_PASSWORD"] not in json.dumps(conns)
