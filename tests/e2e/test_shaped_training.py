"""Resource shapes through the real Trigger path, local Slurm and its login node.

A shaped training (whole node, one task per core, an srun CPU binding, options from the
allow-list) runs to success with those options in its batch script; shapes that cannot run fail
at preflight, once (no retry), with the reason, and submit nothing.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.e2e


def _train_jobs_since(cluster, since: str) -> list[str]:
    """Training jobs (``train.*``) submitted at ``since`` or later (a fixed start: counting a
    sliding 10-minute window lost an earlier test's job between two counts, read as a change)."""
    out = cluster(f"sacct -n -X -P -S {since} -o jobid,jobname,submit")
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    return [job for job, name, submit in rows if name.startswith("train.") and submit >= since]


def test_a_shaped_training_runs_with_its_options(run_dag, api, mlflow_client):
    conf = {"model_name": f"e2e-shape-{uuid.uuid4().hex[:6]}", "max_epochs": 1, "exclusive": True,
            "hint": "nomultithread", "cpu_bind": "cores", "sbatch_extra": {"nice": 10, "mail_type": "NONE"}}
    run, states = run_dag("train_model", conf)
    assert run["state"] == "success", states
    reg = api.xcom("train_model", run["dag_run_id"], "register")
    script = open(mlflow_client.download_artifacts(reg["run_id"], "slurm/job.sh")).read()
    for line in ("#SBATCH --exclusive", "#SBATCH --hint=nomultithread", "#SBATCH --nice=10", "#SBATCH --mail-type=NONE"):
        assert line in script.splitlines(), line
    assert "srun --kill-on-bad-exit=0 --wait=60 --cpu-bind=cores " in script  # a single task, bound through srun
    log = api.task_log("train_model", run["dag_run_id"], "train")
    assert "training complete" in log


@pytest.mark.parametrize("conf, reason", [
    ({"gpus": 1, "gpus_per_node": 1}, "set one of them"),  # both spellings of the GPU count
    ({"constraint": "nosuchfeature"}, "Slurm would reject this job"),  # sbatch --test-only's no
])
def test_a_shape_that_cannot_run_fails_at_preflight_once(run_dag, api, cluster, conf, reason):
    since = cluster("date +%Y-%m-%dT%H:%M:%S").strip()
    run, states = run_dag("train_model", {"model_name": f"e2e-bad-{uuid.uuid4().hex[:6]}", **conf}, timeout=300)
    assert run["state"] == "failed" and states["preflight"] == "failed", states
    assert states["train"] in ("upstream_failed", None), states
    tis = {t["task_id"]: t for t in api.task_instances("train_model", run["dag_run_id"])}
    assert tis["preflight"]["try_number"] == 1, "bad input is not retried"
    assert reason in api.task_log("train_model", run["dag_run_id"], "preflight")
    assert _train_jobs_since(cluster, since) == [], "nothing was submitted"
