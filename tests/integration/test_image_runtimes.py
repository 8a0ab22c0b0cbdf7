"""The training image pulled and run by real container runtimes inside real Slurm jobs.

Each job is submitted over SSH as the cluster user (``sbatch --wait``) with a script shaped like
the Slurm layer's template: job-dir variables exported, secrets sourced from a mode-600 file,
then the ``container_command`` fragment. Registry credentials reach the job only as the
mode-600 files of ``auth_dir``. For each runtime the first job pulls the digest, the second
does not. The image is built from a snapshot of the inputs and published under a repository of
this session's own, so concurrent test sessions on the same daemon and registry cannot pull or
remove it behind our back. podman-hpc (NERSC's, from PyPI over the installed podman:
scripts/install_podman_hpc.sh) runs for real too: pull, migrate to its squash dir once, run.
charliecloud, apptainer and enroot are covered by golden files and by
tests/unit/test_runtimes_exec.py (ch-image cannot pull from the local plain-HTTP registry;
the others are not installable here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from docker.errors import ImageNotFound

from slurmflow.hooks.image import ImageBuildHook
from slurmflow.images import DEFAULT_EXCLUDES, BuildContext
from slurmflow.runtimes import container_command
from slurmflow.secrets import SecretRefs, gather

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


def snapshot_context(dst: Path) -> BuildContext:
    """The build inputs copied aside (training/ is edited concurrently); wheels hard-linked."""
    if not any((REPO / "wheelhouse").glob("torch-*.whl")):
        subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=True, timeout=900)
    shutil.copytree(REPO / "training", dst / "training", ignore=shutil.ignore_patterns(*DEFAULT_EXCLUDES))
    (dst / "docker").mkdir()
    for name in ("training.Dockerfile", "requirements.lock"):
        shutil.copy2(REPO / "docker" / name, dst / "docker" / name)
    shutil.copytree(REPO / "wheelhouse", dst / "wheelhouse", copy_function=os.link)
    return BuildContext(dst)


@pytest.fixture(scope="module")
def image(
    registry_conn: str, stack_env: dict[str, str], cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``registry/slurmflow/itest-<id>@sha256:...``: the training image under this session's repository."""
    hook = ImageBuildHook(registry_conn)
    context = snapshot_context(tmp_path_factory.mktemp("image-context"))
    result = hook.ensure_image(context, "slurmflow/training", stack_env["BASE_IMAGE"])
    try:
        hook.client.inspect_image(result.image)
    except ImageNotFound:  # built elsewhere, or its digest reference removed: fetch it
        auth = hook.registry.docker_auth_config()
        list(hook.client.pull(result.image.split("@")[0], tag=result.digest, stream=True, auth_config=auth))
    ref = hook.repository_ref(f"slurmflow/itest-{uuid.uuid4().hex[:10]}").with_tag("job")
    hook.client.tag(result.image, ref.name, tag=ref.tag)
    pinned = ref.with_digest(hook.push(ref)).pinned()
    yield pinned
    hook.client.remove_image(str(ref))
    subprocess.run(["docker", "rmi", pinned], capture_output=True, check=False)
    cluster.run(f"podman rmi -f {shlex.quote(pinned)}", check=False, timeout=300)
    requests.delete(
        f"http://{ref.registry}/v2/{ref.repository}/manifests/{pinned.split('@')[1]}",
        auth=(stack_env["REGISTRY_USER"], stack_env["REGISTRY_PASSWORD"]),
        timeout=10,
    )


@pytest.fixture(scope="module")
def auth_dir(cluster: Cluster, stack_env: dict[str, str], registry_conn: str) -> Iterator[str]:
    """The job user's registry credentials, from the Airflow connection: mode-600 files, mode-700 folder."""
    path = f"{stack_env['STACK_DIR']}/home/{stack_env['SSH_USER']}/.slurmflow/registry-auth-{uuid.uuid4().hex[:8]}"
    for name, content in gather(SecretRefs(registry_conn_id=registry_conn)).registry_files().items():
        cluster.write_private(f"{path}/{name}", content)
    modes = cluster.run(
        f"stat -c '%a %n' {shlex.quote(path)} {shlex.quote(path)}/* {shlex.quote(path)}/.c*"
    ).stdout
    assert {line.split()[0] for line in modes.splitlines()} <= {"700", "600"}, modes
    yield path
    cluster.run(f"rm -rf {shlex.quote(path)}", check=False)


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


def test_docker_job_pulls_once_and_trains(cluster: Cluster, image: str, auth_dir: str) -> None:
    # Forget the digest reference so the job must pull it; the layers stay, so the pull is quick
    # and the builder's cache survives. (dockerd needs no credentials for content it holds: the
    # podman tests prove the staged credentials.)
    subprocess.run(["docker", "rmi", image], capture_output=True, check=True)
    # the config travels with the job (the image holds no configs: slurmflow.pipeline.experiments)
    config = (REPO / "training" / "configs" / "surrogate.yaml").read_text()
    train = (
        f"{CHECK} && printf '%s' {shlex.quote(config)} > experiment.yaml "
        "&& python -m hpctrain make-data borehole.parquet --rows 256 "
        "&& python -m hpctrain fit --config experiment.yaml --smoke"
    )
    rc, out, job_dir, secret = submit(cluster, "docker", image, ["sh", "-c", train], auth_dir)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" in out
    result = json.loads(cluster.run(f"cat {shlex.quote(job_dir)}/result.json").stdout)
    assert result  # the training result manifest, written by `python -m hpctrain fit` in the container

    rc, out, job_dir, secret = submit(cluster, "docker", image, ["sh", "-c", CHECK], auth_dir)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" not in out


def test_podman_rootless_job_pulls_once(cluster: Cluster, image: str, auth_dir: str) -> None:
    options = dict(insecure_registry=True, run_args=PODMAN_SITE_ARGS)
    rc, out, job_dir, secret = submit(cluster, "podman", image, ["sh", "-c", CHECK], auth_dir, **options)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" in out

    rc, out, job_dir, secret = submit(cluster, "podman", image, ["sh", "-c", CHECK], auth_dir, **options)
    _assert_job(cluster, rc, out, job_dir, secret)
    assert "slurmflow: pulling" not in out


def test_job_without_credentials_cannot_pull(cluster: Cluster, image: str, stack_env: dict) -> None:
    """The staged auth_dir is what lets the job pull: with an empty one the job fails at the pull.

    podman, not docker: dockerd serves a by-digest pull of content it already holds without
    asking the registry, and on this machine one daemon both builds and runs.
    """
    empty = f"{stack_env['STACK_DIR']}/home/{stack_env['SSH_USER']}/.slurmflow/no-auth-{uuid.uuid4().hex[:6]}"
    cluster.write_private(f"{empty}/config.json", "{}\n")
    cluster.run(f"podman rmi -f {shlex.quote(image)}", check=False, timeout=300)  # pulled by the test above
    try:
        rc, out, _, _ = submit(
            cluster, "podman", image, ["true"], empty, insecure_registry=True, run_args=PODMAN_SITE_ARGS
        )
        assert rc != 0
        assert "slurmflow: pulling" in out
        assert "unauthorized" in out.lower() or "authentication required" in out.lower(), out
    finally:
        cluster.run(f"rm -rf {shlex.quote(empty)}", check=False)


def test_podman_hpc_job_pulls_migrates_once_and_trains(
    cluster: Cluster, image: str, auth_dir: str, stack_env: dict
) -> None:
    """NERSC's podman-hpc, as in the seed's robot-account flow: the pull reads the staged mode-600
    auth file, podman-hpc migrates the image to a squashfs in the squash dir once, every job runs
    the squashed image; a job without the credentials cannot pull."""
    proc = cluster.run("command -v podman-hpc && podman-hpc infohpc", check=False)
    assert proc.returncode == 0, f"podman-hpc is not installed on the cluster (make deps): {proc.stderr}"
    home = f"{stack_env['STACK_DIR']}/home/{stack_env['SSH_USER']}"
    cache = f"{home}/.cache/slurmflow-itest-{uuid.uuid4().hex[:8]}"  # a squash dir of this test's own
    options = dict(insecure_registry=True, cache_dir=cache)
    config = (REPO / "training" / "configs" / "surrogate.yaml").read_text()
    train = (
        f"{CHECK} && printf '%s' {shlex.quote(config)} > experiment.yaml "
        "&& python -m hpctrain make-data borehole.parquet --rows 256 "
        "&& python -m hpctrain fit --config experiment.yaml --smoke"
    )
    empty = f"{home}/.slurmflow/no-auth-{uuid.uuid4().hex[:6]}"
    try:
        rc, out, job_dir, secret = submit(cluster, "podman-hpc", image, ["sh", "-c", train], auth_dir, **options)
        _assert_job(cluster, rc, out, job_dir, secret)
        assert out.count("slurmflow: pulling") == 1 and "migrating it to" in out
        assert json.loads(cluster.run(f"cat {shlex.quote(job_dir)}/result.json").stdout)
        squashes = cluster.run(f"ls {shlex.quote(cache)}/podman-hpc/overlay/l/ | grep -c '[.]squash$'").stdout
        assert int(squashes) == 1  # the migrated image: one squashfs
        listed = cluster.run(
            f"podman-hpc --squash-dir {shlex.quote(cache)}/podman-hpc images --no-trunc "
            "--filter readonly=true --format '{{.Repository}}@{{.Digest}}'"
        ).stdout.split()
        assert image in listed

        rc, out, job_dir, secret = submit(cluster, "podman-hpc", image, ["sh", "-c", CHECK], auth_dir, **options)
        _assert_job(cluster, rc, out, job_dir, secret)
        assert "slurmflow: pulling" not in out  # the squashed image is reused

        # Without the staged credentials (and a squash dir without the image) the pull is refused.
        cluster.write_private(f"{empty}/config.json", "{}\n")
        rc, out, _, _ = submit(
            cluster, "podman-hpc", image, ["true"], empty, insecure_registry=True, cache_dir=f"{cache}-noauth"
        )
        assert rc != 0
        assert "slurmflow: pulling" in out
        assert "unauthorized" in out.lower() or "authentication required" in out.lower(), out
    finally:
        # podman-hpc writes parts of the squash dir from its user namespace: remove it from there
        paths = " ".join(shlex.quote(p) for p in (cache, f"{cache}-noauth", empty))
        cluster.run(f"podman unshare rm -rf {paths}", check=False, timeout=300)
