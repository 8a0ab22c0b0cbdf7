"""Preemption as one task: a higher-priority job preempts a train_model training twice.

Real preemption on the local Slurm (include/stack/slurm.conf): the training runs in partition
``spot`` (``PreemptMode=REQUEUE``, ``GraceTime=60``); a job in ``urgent`` (PriorityTier 10) that
fits only where the training runs makes Slurm send the training's own ``--signal`` (USR2) at
once. The training checkpoints and exits 75, the batch script requeues the job, Slurm starts the
same job id again after the urgent job, and the train task follows it all on its first try.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid

import pytest

from tests.e2e.helpers import FIRST_RUN_TIMEOUT, preempt, training, wait_until

pytestmark = pytest.mark.e2e

DAG = "train_model"
EPOCHS = 20  # long enough (~1 s an epoch on an idle node) for two preemptions to land mid-training
TRAIN_MEM_MB = 2048  # the conf's mem: the urgent job asks for half of it beyond what is free (helpers.preempt)


def test_training_preempted_twice_is_one_job_and_one_successful_try(api, cluster):
    assert {"spot", "urgent"} <= set(cluster("sinfo -h -o %R").split()), "slurm.conf without spot/urgent: make up"
    api.wait_for_dag(DAG)
    started = time.monotonic()
    model = f"e2e-preempt-{uuid.uuid4().hex[:6]}"
    run_id = api.trigger(DAG, conf={"partition": "spot", "mem": f"{TRAIN_MEM_MB}M", "max_epochs": EPOCHS,
                                    "batch_size": 32, "model_name": model})["dag_run_id"]
    job = wait_until(lambda: api.xcom(DAG, run_id, "train", key="slurm_job") if api.get(
        f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train")["state"] == "deferred" else None,
        FIRST_RUN_TIMEOUT, "train task deferred on its Slurm job", every=1)
    job_id, job_dir = str(job["job_id"]), job["job_dir"]

    # 1st preemption once an epoch is done (last.ckpt exists), 2nd soon after the first resume
    wait_until(lambda: training(cluster, job_dir, 0) and cluster(
        f"test -e {shlex.quote(job_dir)}/checkpoints/last.ckpt && echo yes || true").strip(), 180,
        "first attempt past its first epoch")
    urgent = [preempt(cluster, job_id, 0)]
    wait_until(lambda: training(cluster, job_dir, 1), 120, "second attempt training", every=0.3)
    time.sleep(1)
    urgent.append(preempt(cluster, job_id, 1))

    run = api.wait_for_run(DAG, run_id, timeout=600)
    elapsed = time.monotonic() - started
    tis = {t["task_id"]: t for t in api.task_instances(DAG, run_id)}
    assert run["state"] == "success", {k: t["state"] for k, t in tis.items()}
    assert tis["train"]["try_number"] == 1  # followed through both requeues, never retried

    result = api.xcom(DAG, run_id, "train")
    assert result["job_id"] == job_id and result["state"] == "COMPLETED" and result["restarts"] == 2

    # One Slurm job for the key: three runs of the same id, the first two requeued, then done.
    lines = cluster(f"sacct -n -X -D -P -S now-1hours --name={shlex.quote(result['job_name'])} "
                    "-o JobID,State,Partition").split()
    runs = [line.split("|") for line in lines]
    assert {r[0] for r in runs} == {job_id}, runs
    assert [r[1] for r in runs][:2] in (["REQUEUED", "REQUEUED"], ["PREEMPTED", "PREEMPTED"],
                                        ["REQUEUED", "PREEMPTED"], ["PREEMPTED", "REQUEUED"])
    assert [r[1] for r in runs][2:] == ["COMPLETED"] and {r[2] for r in runs} == {"spot"}
    for urgent_id in urgent:
        assert cluster(f"sacct -n -X -P -j {urgent_id} -o State").strip() == "COMPLETED"

    # The task log shows each requeue; the job's own log shows the signal and the checkpoints.
    log = api.task_log(DAG, run_id, "train")
    assert "restarts=1" in log and "restarts=2" in log
    assert log.count("forwarding SIGUSR2") == 2 and log.count("requeue requested by the command") == 2

    # No work done twice: each attempt resumed at the step where the previous one checkpointed.
    manifest = json.loads(cluster(f"cat {shlex.quote(job_dir)}/result.json"))
    rows = manifest["training"]["attempts"]
    assert [(a["restart"], a["status"]) for a in rows] == [(0, "preempted"), (1, "preempted"), (2, "completed")]
    assert rows[0]["start_step"] == 0
    redone = [prev["end_step"] - nxt["start_step"] for prev, nxt in zip(rows, rows[1:], strict=False)]
    assert redone == [0, 0], rows
    assert rows[-1]["end_step"] == manifest["training"]["global_step"] == sum(a["end_step"] - a["start_step"] for a in rows)
    assert [h["epoch"] for h in manifest["metrics"]["history"]] == list(range(EPOCHS))
    assert manifest["training"]["restart_count"] == 2 and manifest["training"]["resumed_from"] == "checkpoints/last.ckpt"
    print(f"\npreemption e2e: job {job_id}, urgent jobs {urgent}, try {tis['train']['try_number']}, "
          f"restarts {result['restarts']}, attempts {[(a['start_step'], a['end_step']) for a in rows]}, "
          f"steps redone {redone}, {elapsed:.0f} s")
