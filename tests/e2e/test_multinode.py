"""Multi-node training for real: ``train_model`` with ``nodes=2`` on the local cluster's two slurmd.

``local2``'s slurmd runs in a network namespace of its own (scripts/localstack/nodes.py), so
``srun`` starts two of the four ranks through a second slurmd at another address, and the ranks'
containers find rank 0 at ``MASTER_ADDR`` = the first node of ``SLURM_JOB_NODELIST`` (``local1``,
resolved through /etc/hosts), the port from the job id (Lightning's ``SLURMEnvironment``).

Equivalence: 2 nodes × 2 tasks and 1 node × 4 tasks train the same global batch (4 ranks × the
per-rank batch, the same DistributedSampler shards, the same gloo all-reduce over 4 ranks), so
their validation loss agrees to :data:`TOLERANCE` (relative; the two differ only in where the
ranks run, and gloo's algorithm depends on the world size, not on placement).
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time
import uuid

import pytest

from tests.e2e.helpers import FIRST_RUN_TIMEOUT, job_fields, preempt, training, wait_until

pytestmark = pytest.mark.e2e

DAG = "train_model"
TOLERANCE = 1e-4
COMMON = {"max_epochs": 2, "batch_size": 16, "seed": 7, "data_seed": 3}


def sacct_nodes(cluster, job_id: str) -> tuple[str, int]:
    nodes, count = cluster(f"sacct -n -X -P -j {job_id} -o NodeList,NNodes").strip().splitlines()[-1].split("|")
    return nodes, int(count)


def task_seconds(ti: dict) -> float:
    start, end = (dt.datetime.fromisoformat(ti[k].replace("Z", "+00:00")) for k in ("start_date", "end_date"))
    return (end - start).total_seconds()


def test_both_nodes_serve_the_debug_partition(cluster):
    rows = dict(line.split() for line in cluster("sinfo -h -N -p debug -o '%N %T'").splitlines())
    assert set(rows) == {"local1", "local2"}, rows
    assert all(state.rstrip("*") in {"idle", "mixed", "allocated", "completing"} for state in rows.values()), rows


def test_ddp_on_two_nodes_matches_one_node(api, cluster):
    shapes = {"2x2": {"nodes": 2, "ntasks_per_node": 2}, "1x4": {"nodes": 1, "ntasks_per_node": 4}}
    api.wait_for_dag(DAG)
    started = time.monotonic()
    runs = {name: api.trigger(DAG, conf={**COMMON, **shape, "model_name": f"e2e-ddp-{name}-{uuid.uuid4().hex[:6]}"})
            for name, shape in shapes.items()}
    done = {name: api.wait_for_run(DAG, run["dag_run_id"], timeout=FIRST_RUN_TIMEOUT) for name, run in runs.items()}
    regs, nodes, train_s = {}, {}, {}
    for name, run in done.items():
        tis = {t["task_id"]: t for t in api.task_instances(DAG, run["dag_run_id"])}
        assert run["state"] == "success", (name, {k: t["state"] for k, t in tis.items()})
        train_s[name] = round(task_seconds(tis["train"]))
        regs[name] = api.xcom(DAG, run["dag_run_id"], "register")
        job = api.xcom(DAG, run["dag_run_id"], "train")
        nodes[name] = sacct_nodes(cluster, str(job["job_id"]))
        assert regs[name]["slurm"]["SLURM_NTASKS"] == "4" and regs[name]["slurm"]["SLURM_NNODES"] == str(
            shapes[name]["nodes"]), regs[name]["slurm"]
    assert nodes["2x2"] == ("local[1-2]", 2), nodes  # accounting saw both nodes
    assert nodes["1x4"][1] == 1, nodes
    two, one = regs["2x2"]["metrics"]["val/loss"], regs["1x4"]["metrics"]["val/loss"]
    assert abs(two - one) <= TOLERANCE * abs(one), (two, one)
    # the ranks' log lines come from both hosts' steps: rank 0's banner names the world it joined
    log = api.task_log(DAG, done["2x2"]["dag_run_id"], "train")
    assert "training complete" in log
    print(f"\nmulti-node e2e: val/loss 2x2 {two:.6f} vs 1x4 {one:.6f} (rel diff {abs(two - one) / abs(one):.2e}); "
          f"nodes {nodes}; train task seconds (both at once) {train_s}; {time.monotonic() - started:.0f} s in all")


def test_two_node_training_preempted_resumes_on_both_nodes(api, cluster):
    """A requeue takes the whole allocation: preempted through its second node, the two-node job
    checkpoints on every rank, is requeued as the same job id and resumes from the checkpoint."""
    api.wait_for_dag(DAG)
    run_id = api.trigger(DAG, conf={"partition": "spot", "mem": "2048M", "max_epochs": 20, "batch_size": 32,
                                    "nodes": 2, "ntasks_per_node": 1,
                                    "model_name": f"e2e-preempt2n-{uuid.uuid4().hex[:6]}"})["dag_run_id"]
    job = wait_until(lambda: api.xcom(DAG, run_id, "train", key="slurm_job") if api.get(
        f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train")["state"] == "deferred" else None,
        FIRST_RUN_TIMEOUT, "train task deferred on its Slurm job", every=1)
    job_id, job_dir = str(job["job_id"]), job["job_dir"]
    wait_until(lambda: training(cluster, job_dir, 0) and cluster(
        f"test -e {shlex.quote(job_dir)}/checkpoints/last.ckpt && echo yes || true").strip(), 240,
        "first attempt past its first epoch")
    assert job_fields(cluster, job_id)["NodeList"] == "local[1-2]"
    urgent = preempt(cluster, job_id, 0, node="local2")

    run = api.wait_for_run(DAG, run_id, timeout=900)
    tis = {t["task_id"]: t for t in api.task_instances(DAG, run_id)}
    assert run["state"] == "success", {k: t["state"] for k, t in tis.items()}
    assert tis["train"]["try_number"] == 1
    result = api.xcom(DAG, run_id, "train")
    assert result["job_id"] == job_id and result["restarts"] == 1
    assert cluster(f"sacct -n -X -P -j {urgent} -o State").strip() == "COMPLETED"
    manifest = json.loads(cluster(f"cat {shlex.quote(job_dir)}/result.json"))
    rows = manifest["training"]["attempts"]
    assert [(a["restart"], a["status"]) for a in rows] == [(0, "preempted"), (1, "completed")]
    assert rows[1]["start_step"] == rows[0]["end_step"] > 0, rows  # resumed where it checkpointed
    assert manifest["slurm"]["SLURM_NNODES"] == "2" and manifest["training"]["resumed_from"] == "checkpoints/last.ckpt"
    assert sacct_nodes(cluster, job_id) == ("local[1-2]", 2)
