"""The rendered fragments executed by a real shell with fake runtime binaries on PATH.

The fakes (shell scripts) log their argv and produce what the real tools would (a converted
directory, a .sif, a .sqsh, an image in a store), slowly, so concurrent jobs really overlap. This
checks the cluster-side caching logic itself: one pull per digest, even for concurrent array
tasks; failures leave nothing behind; credentials reach the pull and never the command. The real
runtimes run in tests/integration/test_image_runtimes.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from slurmflow.runtimes import container_command, registry_auth_files
from slurmflow.secrets import JOB_SECRET_NAMES

DIGEST = "sha256:" + "5a" * 32
IMAGE = f"registry.example.org/slurmflow/training@{DIGEST}"

# argv[0]-routed fake: logs "<tool> <args>" and acts like the real tool where the fragment cares.
FAKE = r"""#!/bin/bash
tool=$(basename "$0")
[ "$tool $1" = "podman-hpc --squash-dir" ] && shift 2  # podman-hpc's own option, before the subcommand
printf '%s %s\n' "$tool" "$*" >> "$FAKE_LOG"
env > "$FAKE_DIR/env.$tool.$$"
store="$FAKE_DIR/store"
case "$tool $1" in
  "docker image"|"podman image") [ -e "$store/$tool" ] ;;
  "podman-hpc images") cat "$store/$tool" 2>/dev/null ;;  # the squash dir's images, as repo@digest
  "docker --config"|"docker pull"|"podman pull"|"podman-hpc pull")
      [ -n "$FAKE_FAIL" ] && exit 1; sleep 0.3; [ -n "$FAKE_NO_MIGRATE" ] && exit 0  # podman-hpc: exit 0 anyway
      mkdir -p "$store"; echo "${@: -1}" > "$store/$tool" ;;
  "ch-image pull") [ -n "$FAKE_FAIL" ] && exit 1; sleep 0.3 ;;
  "ch-convert "*) out=${@: -1}; mkdir -p "$out/ch"; echo "PATH=/opt/venv/bin" > "$out/ch/environment" ;;
  "apptainer pull"|"singularity pull")  # first non-flag argument after "pull" is the output file
      [ -n "$FAKE_FAIL" ] && exit 1; sleep 0.3; shift; while [ "${1#-}" != "$1" ]; do shift; done; touch "$1" ;;
  "enroot import") [ -n "$FAKE_FAIL" ] && exit 1; sleep 0.3; touch "$3" ;;
  *) echo "RUN $tool $*" ;;
esac
"""
TOOLS = (
    "docker",
    "podman",
    "podman-hpc",
    "ch-image",
    "ch-convert",
    "ch-run",
    "apptainer",
    "singularity",
    "enroot",
    "srun",
    "ch-fromhost",
)


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(FAKE)
        path.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_DIR": str(tmp_path),
    }


def _run(fragment: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    # Like the sbatch template: the fragment runs inside a subshell of a bash job script.
    return subprocess.run(
        ["bash", "-c", f"(\n{fragment}\n)"], env={**env, **extra}, text=True, capture_output=True, timeout=60
    )


def _calls(env: dict[str, str], prefix: str) -> list[str]:
    log = Path(env["FAKE_LOG"])
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)] if log.exists() else []


PULLS = {
    "docker": "docker --config",
    "podman": "podman pull",
    "podman-hpc": "podman-hpc pull",
    "charliecloud": "ch-image pull",
    "apptainer": "apptainer pull",
    "singularity": "singularity pull",
    "enroot": "enroot import",
}


@pytest.mark.parametrize("runtime", sorted(PULLS))
def test_second_job_with_the_same_digest_does_not_pull(runtime: str, fake: dict, tmp_path: Path) -> None:
    text = container_command(
        runtime, IMAGE, ["python", "-V"], cache_dir=str(tmp_path / "cache"), auth_dir=str(tmp_path / "auth")
    )
    for _ in range(2):
        proc = _run(text, fake)
        assert proc.returncode == 0, proc.stderr
        assert "python -V" in proc.stdout
    assert len(_calls(fake, PULLS[runtime])) == 1


@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "enroot", "podman", "podman-hpc"])
def test_concurrent_array_tasks_convert_once(runtime: str, fake: dict, tmp_path: Path) -> None:
    text = container_command(runtime, IMAGE, ["true"], cache_dir=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(["bash", "-c", text], env=fake, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    assert len(_calls(fake, PULLS[runtime])) == 1
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*.tmp.*")]
    assert leftovers == []


@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "enroot"])
def test_a_failed_pull_fails_the_job_and_leaves_no_half_image(
    runtime: str, fake: dict, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    text = container_command(runtime, IMAGE, ["python", "-V"], cache_dir=str(cache))
    proc = _run(text, fake, FAKE_FAIL="1")
    assert proc.returncode == 1
    assert "python -V" not in proc.stdout
    assert [p.name for p in cache.rglob("*") if not p.name.endswith(".lock")] == [runtime]
    # The next job retries (and succeeds once the registry is back).
    assert _run(text, fake).returncode == 0
    assert len(_calls(fake, PULLS[runtime])) == 2


def test_podman_hpc_fails_the_job_when_the_migration_did_not_happen(fake: dict, tmp_path: Path) -> None:
    """podman-hpc's pull exits 0 when its migration to the squash dir failed: the fragment checks."""
    text = container_command("podman-hpc", IMAGE, ["python", "-V"], cache_dir=str(tmp_path / "cache"))
    proc = _run(text, fake, FAKE_NO_MIGRATE="1")
    assert proc.returncode == 1
    assert "did not migrate" in proc.stderr
    assert "python -V" not in proc.stdout
    assert _run(text, fake).returncode == 0  # the next job pulls again
    assert len(_calls(fake, "podman-hpc pull")) == 2
    assert len(_calls(fake, "podman-hpc rmi")) == 1  # the node-local copy, once migrated


def test_registry_credentials_reach_the_pull_but_not_the_command(fake: dict, tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o700)
    for name, content in registry_auth_files("registry.example.org", "alice", "s3cr3t").items():
        (auth / name).write_text(content)
        (auth / name).chmod(0o600)
    text = container_command(
        "charliecloud", IMAGE, ["python", "-V"], cache_dir=str(tmp_path / "cache"), auth_dir=str(auth)
    )
    assert _run(text, fake).returncode == 0
    pull_env = next(tmp_path.glob("env.ch-image.*")).read_text()
    run_env = next(tmp_path.glob("env.ch-run.*")).read_text()
    assert "CH_IMAGE_PASSWORD=s3cr3t" in pull_env
    assert "s3cr3t" not in run_env
    assert all("s3cr3t" not in line for line in _calls(fake, ""))  # never in any argv


def test_env_file_values_are_taken_literally(fake: dict, tmp_path: Path) -> None:
    env_file = tmp_path / "job.env"
    env_file.write_text("A=x y\nB=$HOME;touch /tmp/pwned\n# comment\nC='q'\n1BAD=no\n\nD=last-no-newline")
    text = container_command(
        "none", None, ["sh", "-c", 'printf "%s|" "$A" "$B" "$C" "$D"'], env_file=str(env_file)
    )
    proc = _run(text, fake)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "x y|$HOME;touch /tmp/pwned|'q'|last-no-newline|"


#: the tool that starts the container, per runtime (its environment is what the container gets)
RUNNER = {"docker": "docker", "podman": "podman", "podman-hpc": "podman-hpc", "charliecloud": "ch-run",
          "apptainer": "apptainer", "singularity": "singularity", "enroot": "srun"}


@pytest.mark.parametrize("runtime", sorted(RUNNER))
def test_the_job_secrets_reach_the_container_by_name_never_by_argv(runtime: str, fake: dict, tmp_path: Path) -> None:
    """As in a job: the batch shell sourced the secrets file, the fragment names the variables."""
    values = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "hunter2-pw",
              "MONGO_URI": "mongodb://trainer:p%40ss@db:27017/campaigns"}
    text = container_command(runtime, IMAGE, ["true"], pass_env=JOB_SECRET_NAMES, cache_dir=str(tmp_path / "cache"))
    proc = _run(text, fake, **values)
    assert proc.returncode == 0, proc.stderr
    argv = Path(fake["FAKE_LOG"]).read_text()
    assert "hunter2-pw" not in argv and "p%40ss" not in argv
    runner_env = "".join(p.read_text() for p in tmp_path.glob(f"env.{RUNNER[runtime]}.*"))
    assert all(f"{k}={v}\n" in runner_env for k, v in values.items())
    if runtime in ("docker", "podman", "podman-hpc"):
        assert "-e MONGO_URI " in _calls(fake, f"{runtime} run")[0]


def test_charliecloud_creates_bind_targets_in_the_image(fake: dict, tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "run 1"
    text = container_command(
        "charliecloud", IMAGE, ["true"], cache_dir=str(tmp_path / "cache"), binds=[str(job)], workdir=str(job)
    )
    assert _run(text, fake).returncode == 0
    image_dir = tmp_path / "cache" / "charliecloud" / DIGEST.replace(":", "-")
    assert (image_dir / str(job).lstrip("/")).is_dir()


def test_job_variables_in_paths_expand_in_the_job(fake: dict, tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "run 1"  # the Slurm layer exports it; a space must survive
    text = container_command(
        "charliecloud",
        IMAGE,
        ["true"],
        cache_dir="$SCRATCH_IMAGES",
        binds=["$SLURMFLOW_JOB_DIR"],
        workdir="${SLURMFLOW_JOB_DIR}/work",
        env_file="$SLURMFLOW_JOB_DIR/.env",
    )
    proc = _run(text, fake, SLURMFLOW_JOB_DIR=str(job), SCRATCH_IMAGES=str(tmp_path / "scratch"))
    assert proc.returncode == 0, proc.stderr
    image_dir = tmp_path / "scratch" / "charliecloud" / DIGEST.replace(":", "-")
    assert (image_dir / str(job).lstrip("/") / "work").is_dir()
    run = _calls(fake, "ch-run")[0]
    assert f"--bind={job}:{job}" in run and f"--cd={job}/work" in run and f"--set-env={job}/.env" in run
