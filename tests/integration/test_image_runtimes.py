"""The training image pulled and run by real container runtimes inside real Slurm jobs.

Each job is submitted over SSH as the cluster user (``sbatch --wait``) with a script shaped like
the Slurm layer's template: job-dir variables exported, secrets sourced from a mode-600 file,
then the ``container_command`` fragment. Registry credentials reach the job only as the
mode-600 files of ``auth_dir``. For each runtime the first job pulls the digest, the second
does not. charliecloud, apptainer, podman-hpc and enroot are covered by golden files and by
tests/unit/test_runtimes_exec.py (ch-image cannot pull from the local plain-HTTP registry;
the others are not installable here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurmflow.hooks.image import ImageBuildHook, ImageResult
from slurmflow.hooks.registry import RegistryHook
from slurmflow.images import BuildContext
from slurmflow.runtimes import container_command

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONN_ID = "registry_itest_jobs"
SECRET_NAME = "SLURMFLOW_TEST_SECRET"
# The local machine's podman needs these (see the stack notes); a real site sets its own.
PODMAN_SITE_ARGS = ["--runtime", "runc", "--ulimit", "nofile=20000:20000"]


class Cluster:
    """Just enough of a login node: run a command, or write a file from stdin (never argv)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.base = [
            "ssh",
            "-i",
            env["SSH_KEY"],
            "-p",
            env["SSH_PORT"],
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            f"{env['SSH_USER']}@{env['SSH_HOST']}",
        ]

    def run(
        self, command: str, *, input: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.base, command], input=input, text=True, capture_output=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{command!r} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def write_private(self, path: str, content: str) -> None:
        self.run(
            f"umask 077 && mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)}",
            input=content,
        )


@pytest.fixture(scope="module")
def cluster(stack_env: dict[str, str]) -> Cluster:
    return Cluster(stack_env)


@pytest.fixture(scope="module")
def registry_conn(stack_env: dict[str, str]) -> Iterator[str]:
    value = json.dumps(
        {
            "conn_type": "docker",
            "host": stack_env["REGISTRY"],
            "login": stack_env["REGISTRY_USER"],
            "password": stack_env["REGISTRY_PASSWORD"],
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", value)
        yield CONN_ID


@pytest.fixture(scope="module")
def image(registry_conn: str, stack_env: dict[str, str]) -> ImageResult:
    """The working tree's image, pinned (usually already pushed by test_image_build.py: no build)."""
    if not any((REPO / "wheelhouse").glob("torch-*.whl")):
        subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=True, timeout=900)
    return ImageBuildHook(registry_conn).ensure_image(
        BuildContext(REPO), "slurmflow/training", stack_env["BASE_IMAGE"]
    )


@pytest.fixture(scope="module")
def auth_dir(cluster: Cluster, stack_env: dict[str, str], registry_conn: str) -> str:
    """The job user's registry credentials, from the Airflow connection: mode-600 files, mode-700 folder."""
    path = f"{stack_env['STACK_DIR']}/home/{stack_env['SSH_USER']}/.slurmflow/registry-auth"
    for name, content in RegistryHook(registry_conn).job_auth_files().items():
        cluster.write_private(f"{path}/{name}", content)
    modes = cluster.run(
        f"stat -c '%a %n' {shlex.quote(path)} {shlex.quote(path)}/* {shlex.quote(path)}/.c*"
    ).stdout
    assert {line.split()[0] for line in modes.splitlines()} <= {"700", "600"}, modes
    return path


def submit(
    cluster: Cluster, runtime: str, image: str, command: list[str], auth_dir: str, **options: object
) -> tuple[int, str, str, str]:
    """Run the fragment in a real job; return (exit code, job output, job dir, secret)."""
    env = cluster.env
    job_dir = f"{env['CLUSTER_JOB_ROOT']}/itest-image-{runtime}-{uuid.uuid4().hex[:8]}"
    secret = "s3cret-" + uuid.uuid4().hex
    cluster.write_private(f"{job_dir}/secrets.env", f"export {SECRET_NAME}={shlex.quote(secret)}\n")
    fragment = container_command(
        runtime,
        image,
        command,
        binds=["$SLURMFLOW_JOB_DIR"],
        workdir="$SLURMFLOW_JOB_DIR",
        pass_env=["SLURMFLOW_JOB_DIR", "HPCTRAIN_JOB_DIR", SECRET_NAME],
        auth_dir=auth_dir,
        **options,
    )
    # The shape of include/sbatch/job.sh.j2: exports, sourced secrets, cd, the fragment in a subshell.
    script = "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name=itest-image-{runtime}",
            f"#SBATCH --output={job_dir}/slurm-%j.out",
            f"#SBATCH --partition={env['SLURM_PARTITION']}",
            f"#SBATCH --account={env['SLURM_ACCOUNT']}",
            "#SBATCH --time=00:15:00",
            f"export SLURMFLOW_JOB_DIR={shlex.quote(job_dir)}",
            f"export HPCTRAIN_JOB_DIR={shlex.quote(job_dir)}",
            "set +x",
            f". {shlex.quote(job_dir + '/secrets.env')}",
            'cd "$SLURMFLOW_JOB_DIR" || exit 1',
            "(",
            fragment,
            ")",
        ]
    )
    assert secret not in script
    cluster.write_private(f"{job_dir}/job.sh", script + "\n")
    proc = cluster.run(
        f"sbatch --wait --parsable {shlex.quote(job_dir + '/job.sh')}", timeout=900, check=False
    )
    job_id = proc.stdout.strip().split(";")[0]
    output = cluster.run(f"cat {shlex.quote(job_dir)}/slurm-{job_id}.out", check=False).stdout
    return proc.returncode, output, job_dir, secret


def secret_tag(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


# In the container: the job's uid, the secret handed over by name (proved by its hash), output
# written into the bind-mounted job directory.
CHECK = (
    'echo "uid=$(id -u)"; '
    f'echo "secret-sha=$(printf %s "${SECRET_NAME}" | sha256sum | cut -c1-16)"; '
    'echo "cwd=$(pwd)"; echo "slurm-job=${SLURM_JOB_ID:-unset}"; python -c "import hpctrain" && echo from-container > "$HPCTRAIN_JOB_DIR/marker.txt"'
)


def _assert_job(cluster: Cluster, rc: int, out: str, job_dir: str, secret: str) -> None:
    assert rc == 0, out
    uid = cluster.run("id -u").stdout.strip()
    assert f"uid={uid}" in out
    assert f"secret-sha={secret_tag(secret)}" in out
    assert f"cwd={job_dir}" in out
    assert "slurm-job=unset" not in out  # Slurm's variables reach the container too
    assert secret not in out
    owner = cluster.run(f"stat -c %u {shlex.quote(job_dir)}/marker.txt").stdout.strip()
    assert owner == uid  # written as the job's user, not root or a container uid


def test_docker_job_pulls_once_and_trains(cluster: Cluster, image: ImageResult, auth_dir: str) -> None:
    # Forget the digest reference so the job must pull it (with the staged credentials); the
    # layers stay, so the pull is quick and the builder's cache survives.
    subprocess.run(["docker", "rmi", image.image], capture_output=True, check=False)
    train = (
        f"{CHECK} && python -m hpctrain make-data borehole.parquet --rows 256 "
        "&& python -m hpctrain fit --config /opt/hpctrain/configs/surrogate.yaml --smoke"
    )
    rc, out, job_dir, secret = submit(cluster, "docker", image.image, ["sh", "-c", train], auth_dir)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" in out
    result = json.loads(cluster.run(f"cat {shlex.quote(job_dir)}/result.json").stdout)
    assert result  # the training result manifest, written by `python -m hpctrain fit` in the container

    rc, out, job_dir, secret = submit(cluster, "docker", image.image, ["sh", "-c", CHECK], auth_dir)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" not in out


def test_podman_rootless_job_pulls_once(cluster: Cluster, image: ImageResult, auth_dir: str) -> None:
    cluster.run(f"podman rmi -f {shlex.quote(image.image)}", check=False)
    options = dict(insecure_registry=True, run_args=PODMAN_SITE_ARGS)
    rc, out, job_dir, secret = submit(
        cluster, "podman", image.image, ["sh", "-c", CHECK], auth_dir, **options
    )
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" in out

    rc, out, job_dir, secret = submit(
        cluster, "podman", image.image, ["sh", "-c", CHECK], auth_dir, **options
    )
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" not in out


def test_job_without_credentials_cannot_pull(cluster: Cluster, image: ImageResult, stack_env: dict) -> None:
    """The staged auth_dir is what lets the job pull: an empty one fails the job at the pull."""
    empty = f"{stack_env['STACK_DIR']}/home/{stack_env['SSH_USER']}/.slurmflow/no-auth-{uuid.uuid4().hex[:6]}"
    cluster.write_private(f"{empty}/config.json", "{}\n")
    subprocess.run(["docker", "rmi", image.image], capture_output=True, check=False)
    try:
        rc, out, _, _ = submit(cluster, "docker", image.image, ["true"], empty)
        assert rc != 0
        assert "slurmflow: pulling" in out
        assert "no basic auth credentials" in out or "unauthorized" in out.lower(), out
    finally:
        cluster.run(f"rm -rf {shlex.quote(empty)}", check=False)
