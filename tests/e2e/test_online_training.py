"""online_training on the local cluster: store + producers + trainer in one Slurm job (issue 16).

What each batch went through is read back from the job directory on the cluster: the trainer's
``data/online/taken-rank*.jsonl`` (each batch downloaded from the store, by which rank, in which
attempt) and ``epochs-rank*.jsonl`` (the batches each rank trained on in each epoch). The model is
loaded with MLflow's own loader and must tell the producing rank from a sample well above chance.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid

import numpy as np
import pytest

from scripts.airflow_api import AirflowAPIError
from tests.e2e.helpers import FIRST_RUN_TIMEOUT, preempt, wait_until

pytestmark = pytest.mark.e2e

DAG = "online_training"


def _rows(cluster, job_dir: str, kind: str) -> list[dict]:
    """Every row of the trainer's ``<kind>-rank<r>.jsonl`` files, each with its file's rank."""
    out = cluster(f"grep -H . {shlex.quote(job_dir)}/data/online/{kind}-rank*.jsonl 2>/dev/null || true")
    rows = []
    for line in out.splitlines():
        path, _, row = line.partition(".jsonl:")
        rows.append({"rank": int(path.rsplit("rank", 1)[1]), **json.loads(row)})
    return rows


def _every_batch_once(cluster, job_dir: str, producers: int, rounds: int) -> list[dict]:
    taken = _rows(cluster, job_dir, "taken")
    keys = [(r["producer"], r["iteration"]) for r in taken]
    assert len(keys) == len(set(keys)), "a batch was taken twice"
    per_producer: dict[str, list[int]] = {}
    for producer, iteration in keys:
        per_producer.setdefault(producer, []).append(iteration)
    assert len(per_producer) == producers, per_producer.keys()
    assert all(sorted(its) == list(range(rounds)) for its in per_producer.values()), per_producer
    return taken


def _submitted(api, run_id: str) -> dict:
    """The train task's job record once it is deferred on its Slurm job."""
    def job():
        ti = api.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train")
        return api.xcom(DAG, run_id, "train", key="slurm_job") if ti["state"] == "deferred" else None

    return wait_until(job, FIRST_RUN_TIMEOUT, "train task deferred on its Slurm job", every=1)


def _run(api, conf: dict, timeout: float = FIRST_RUN_TIMEOUT) -> tuple[str, dict]:
    api.wait_for_dag(DAG)
    run_id = api.trigger(DAG, conf={"model_name": f"e2e-online-{uuid.uuid4().hex[:6]}", **conf})["dag_run_id"]
    return run_id, api.wait_for_run(DAG, run_id, timeout=timeout)


def _assert_success(api, run_id: str, run: dict) -> None:
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert run["state"] == "success", states


def test_defaults_train_on_every_batch_once_and_the_model_tells_the_ranks_apart(api, cluster, mlflow_client,
                                                                               catalog_db, stack_env):
    import mlflow

    mlflow.set_tracking_uri(stack_env["MLFLOW_TRACKING_URI"])

    started = time.monotonic()
    run_id, run = _run(api, {})
    _assert_success(api, run_id, run)
    reg, job = api.xcom(DAG, run_id, "register"), api.xcom(DAG, run_id, "train")
    m = reg["metrics"]
    assert m["online/samples_consumed"] == 2 * 2 * 20 * 64 and m["online/dead_producers"] == 0
    assert m["online/batches_per_producer"] == m["online/batches_per_producer_min"] == 20
    assert 0 <= m["online/staleness_p50_s"] <= m["online/staleness_p95_s"]
    _every_batch_once(cluster, job["job_dir"], producers=4, rounds=20)

    # MLflow's loader: the model predicts the producing rank (2 classes: chance is 0.5)
    model = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['model_version']}")
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(rank, 2.0, (500, 16)) for rank in (0, 1)]).astype(np.float32)
    accuracy = float((np.asarray(model.predict(x)).argmax(1) == np.repeat([0, 1], 500)).mean())
    assert accuracy > 0.7, accuracy
    run_data = mlflow_client.get_run(reg["run_id"]).data
    assert run_data.metrics["online/samples_consumed"] == 5120 and "train/accuracy" in run_data.metrics

    # the three components ran as steps of the one job, and the log shows each of them
    steps = cluster(f"sacct -n -P -j {job['job_id']} -o JobName,State").split()
    assert len([s for s in steps if s.endswith("|COMPLETED")]) >= 4, steps  # batch, store, producers, trainer
    log = api.task_log(DAG, run_id, "train")
    assert "[store]" in log and "staging store at local" in log and "[producer] 3:" in log
    assert "training complete" in log
    # the password stayed in the secrets file (gone now): not in the script, the log, or the store's folder
    staging = cluster(f"ls -A {shlex.quote(job['job_dir'])}/.staging").split()
    assert staging == ["address"], staging
    script = cluster(f"cat {shlex.quote(job['script_path'])}")
    assert "SLURMFLOW_STAGING_PASSWORD=" not in script and "requirepass" not in log
    doc = catalog_db["runs"].find_one({"run_key": job["run_key"]}) or {}
    assert doc.get("state") == "registered" and doc["data"]["dead_producers"] == [], doc.get("data")
    print(f"\nonline e2e (defaults): accuracy {accuracy:.3f}, staleness p50 {m['online/staleness_p50_s']} s / "
          f"p95 {m['online/staleness_p95_s']} s, {time.monotonic() - started:.0f} s in all")


def test_two_trainer_ranks_use_each_batch_on_exactly_one_rank_per_epoch(api, cluster):
    run_id, run = _run(api, {"trainer_ranks": 2, "rounds": 10})
    _assert_success(api, run_id, run)
    job = api.xcom(DAG, run_id, "train")
    taken = _every_batch_once(cluster, job["job_dir"], producers=4, rounds=10)
    assert {r["rank"] for r in taken} == {0, 1}
    by_epoch: dict[int, dict[int, dict]] = {}
    for row in _rows(cluster, job["job_dir"], "epochs"):
        by_epoch.setdefault(row["epoch"], {})[row["rank"]] = row
    assert by_epoch and all(set(per) == {0, 1} for per in by_epoch.values()), by_epoch
    for per_rank in by_epoch.values():
        a, b = per_rank[0]["batches"], per_rank[1]["batches"]
        assert not set(a) & set(b) and sorted(a + b) == list(range(len(a) + len(b)))
    assert len(a) + len(b) == 40
    manifest = json.loads(cluster(f"cat {shlex.quote(job['job_dir'])}/result.json"))
    assert manifest["hyperparameters"]["trainer"]["devices"] == 2


def test_a_killed_producer_is_reported_and_the_run_still_ends(api, cluster, catalog_db):
    api.wait_for_dag(DAG)
    run_id = api.trigger(DAG, conf={"model_name": f"e2e-online-{uuid.uuid4().hex[:6]}", "rounds": 60,
                                    "interval_s": 0.5, "producer_timeout_s": 10})["dag_run_id"]
    job = _submitted(api, run_id)
    job_dir = job["job_dir"]
    wait_until(lambda: len(_rows(cluster, job_dir, "taken")) >= 8, 300, "the trainer took its first batches")
    # producer rank 1 (replica 0, rank 1) dies: its container is killed like a crashed simulation
    fmt = shlex.quote("{{.Id}} {{json .Config.Cmd}} {{json .Config.Env}}")
    killed = cluster(
        f"for c in $(docker ps -q --filter label=slurmflow.slurm_job_id={job['job_id']}); do "
        f"docker inspect -f {fmt} $c; done | grep '\"produce\"' | grep '\"SLURM_PROCID=1\"' | cut -d' ' -f1 "
        "| xargs -r docker kill").split()
    assert len(killed) == 1, killed
    run = api.wait_for_run(DAG, run_id, timeout=600)
    _assert_success(api, run_id, run)
    reg = api.xcom(DAG, run_id, "register")
    dead = reg["data"]["dead_producers"]
    assert [p.rsplit(":", 2)[-2:] for p in dead] == [["producer_0", "1"]], dead
    assert reg["metrics"]["online/dead_producers"] == 1
    per = reg["data"]["batches_per_producer"]
    assert per[dead[0]] < 60 and all(n == 60 for p, n in per.items() if p != dead[0]), per
    doc = catalog_db["runs"].find_one({"run_key": job["run_key"]})
    assert doc and doc["data"]["dead_producers"] == dead
    assert "is dead" in api.task_log(DAG, run_id, "train")


def test_a_preempted_job_resumes_from_the_cursor_without_repeating_or_skipping(api, cluster):
    api.wait_for_dag(DAG)
    run_id = api.trigger(DAG, conf={"model_name": f"e2e-online-{uuid.uuid4().hex[:6]}", "partition": "spot",
                                    "mem_per_cpu": "1024M", "rounds": 120, "interval_s": 0.5})["dag_run_id"]
    job = _submitted(api, run_id)
    job_id, job_dir = str(job["job_id"]), job["job_dir"]
    # the trainer checkpoints on the preemption signal itself (cursor included): no epoch-end checkpoint needed
    wait_until(lambda: len(_rows(cluster, job_dir, "taken")) >= 12, 300, "the trainer took its first batches")
    preempt(cluster, job_id, 0, node=job_node(cluster, job_id), train_mem_mb=6 * 1024)
    run = api.wait_for_run(DAG, run_id, timeout=900)
    _assert_success(api, run_id, run)
    result = api.xcom(DAG, run_id, "train")
    assert result["job_id"] == job_id and result["restarts"] == 1
    taken = _every_batch_once(cluster, job_dir, producers=4, rounds=120)
    assert {r["restart"] for r in taken} == {0, 1}
    manifest = json.loads(cluster(f"cat {shlex.quote(job_dir)}/result.json"))
    assert manifest["training"]["resumed_from"] == "checkpoints/last.ckpt"
    assert [a["status"] for a in manifest["training"]["attempts"]] == ["preempted", "completed"]
    log = api.task_log(DAG, run_id, "train")
    assert "resumed at cursor" in log


def job_node(cluster, job_id: str) -> str:
    return cluster(f"squeue -h -j {job_id} -o %N").strip().split(",")[0] or "local1"


@pytest.mark.parametrize("conf, reason", [
    ({"ranks_per_replica": 1}, "ranks_per_replica"),  # one rank = one class: nothing to learn
    ({"interval_s": -1}, "interval_s"),
    ({"trainer_ranks": 0}, "trainer_ranks"),
    ({"mem_per_cpu": "1G; id"}, "mem_per_cpu"),
])
def test_bad_params_are_refused_at_trigger_time(api, conf, reason):
    api.wait_for_dag(DAG)
    before = api.get(f"/dags/{DAG}/dagRuns?limit=1")["total_entries"]
    with pytest.raises(AirflowAPIError) as err:
        api.trigger(DAG, conf=conf)
    assert err.value.status == 400 and reason in str(err.value.detail), err.value
    assert api.get(f"/dags/{DAG}/dagRuns?limit=1")["total_entries"] == before


def test_an_ensemble_larger_than_the_partition_fails_at_preflight_and_submits_nothing(api, cluster):
    since = cluster("date +%Y-%m-%dT%H:%M:%S").strip()
    run_id, run = _run(api, {"replicas": 8, "ranks_per_replica": 4, "cpus_per_task": 1})
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert run["state"] == "failed" and states["preflight"] == "failed" and states["train"] != "success", states
    log = api.task_log(DAG, run_id, "preflight")
    assert "1 store + 8 x 4 producers + 1 trainer rank(s) = 34 tasks of 1 CPU(s)" in log, log[-2000:]
    submitted = cluster(f"sacct -n -X -P -S {since} -o jobid,submit").split()
    assert [row for row in submitted if row.split("|")[-1] >= since] == [], "nothing was submitted"
