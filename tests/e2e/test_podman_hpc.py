"""train_model with NERSC's runtime, podman-hpc, installed for real on the local cluster (make deps).

The run's registry login reaches the job only as the staged mode-600 auth file (the seed's robot
account flow); the first job pulls the image by digest and podman-hpc migrates it to a squashfs
in its squash dir (``<image cache>/podman-hpc``) once; a later job of that digest runs the
squashed image without pulling.
"""

from __future__ import annotations

import shlex
import uuid

import pytest

pytestmark = pytest.mark.e2e

CONF = {"container_runtime": "podman-hpc", "max_epochs": 1}
PULLED = "slurmflow: pulling"
# The squash dir the fragment uses when the site sets no SLURMFLOW_IMAGE_CACHE (runtimes.DEFAULT_CACHE_DIR).
SQUASH_DIR = '"${SLURMFLOW_IMAGE_CACHE:-$HOME/.cache/slurmflow/images}/podman-hpc"'


def _squashed(cluster) -> list[str]:
    """``repo@digest`` of every image in the cluster user's podman-hpc squash dir."""
    return cluster(
        f"podman-hpc --squash-dir {SQUASH_DIR} images --no-trunc --filter readonly=true "
        "--format '{{.Repository}}@{{.Digest}}' 2>/dev/null || true"
    ).split()


def _train(run_dag, api, cluster) -> tuple[dict, dict, dict, str, str]:
    """One train_model run with podman-hpc: (run, task states, the job's XCom, job output, script)."""
    run, states = run_dag("train_model", {**CONF, "model_name": f"e2e-podman-hpc-{uuid.uuid4().hex[:6]}"},
                          timeout=1500)
    assert run["state"] == "success", states
    job = api.xcom("train_model", run["dag_run_id"], "train")
    job_dir = shlex.quote(job["job_dir"])
    output = cluster(f"cat {job_dir}/slurm-{int(job['job_id'])}.out")
    script = cluster(f"cat {job_dir}/job.sbatch")
    return run, states, job, output, script


@pytest.fixture(scope="module")
def first(run_dag, api, cluster):
    # Start from an empty squash dir (only this module uses the default one), so the first run
    # really pulls and migrates; podman-hpc wrote parts of it from its user namespace.
    cluster(f"podman unshare rm -rf {SQUASH_DIR}")
    return _train(run_dag, api, cluster)


@pytest.fixture(scope="module")
def second(first, run_dag, api, cluster):
    return _train(run_dag, api, cluster)


def test_train_model_with_podman_hpc_trains_and_registers(first, second, api):
    for run, states, job, _, script in (first, second):
        assert set(states.values()) == {"success"}, states
        assert job["state"] == "COMPLETED" and job["exit_code"] == 0
        assert "podman-hpc --squash-dir" in script and " run --rm " in script
        reg = api.xcom("train_model", run["dag_run_id"], "register")
        assert reg["model_version"] == "1" and reg["metrics"]["val/loss"] > 0


def test_the_image_is_pulled_and_migrated_once(first, second, cluster):
    _, _, _, out1, script = first
    _, _, _, out2, _ = second
    image = script.split("sf_image=", 1)[1].split("\n", 1)[0].strip("'\"")
    assert out1.count(PULLED) == 1 and "migrating it to" in out1, out1
    assert PULLED not in out2, out2
    assert image in _squashed(cluster)  # the job ran the squashed image, listed read-only


def test_the_pull_reads_the_staged_mode_600_auth_file(first, cluster, stack_env):
    _, _, _, output, script = first
    auth = script.split("--authfile ", 1)[1].split(" ", 1)[0]
    path = cluster(f"printf %s {auth}")  # "${HOME}"/... as the job's shell expands it
    modes = cluster(f"stat -c %a {shlex.quote(path)} \"$(dirname {shlex.quote(path)})\"").split()
    assert modes == ["600", "700"], modes
    secret = stack_env["REGISTRY_PASSWORD"]
    assert secret not in script and secret not in output
