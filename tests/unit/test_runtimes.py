"""Rendering of the container runtimes' command block: golden files, quoting, validation.

Golden files live in tests/unit/golden/runtimes/; regenerate them after an intended change with
``SLURMFLOW_UPDATE_GOLDEN=1 pytest tests/unit/test_runtimes.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from slurmflow.runtimes import (
    ALIASES,
    RUNTIMES,
    Bind,
    container_command,
    env_file_text,
    registry_auth_files,
    resolve_runtime,
)
from slurmflow.secrets import JOB_SECRET_NAMES

GOLDEN = Path(__file__).parent / "golden" / "runtimes"
UPDATE = os.environ.get("SLURMFLOW_UPDATE_GOLDEN") == "1"
DIGEST = "sha256:" + "3f" * 32
IMAGE = f"registry.example.org:5000/slurmflow/training@{DIGEST}"
JOB_DIR = "/scratch/jobs/nightly run 7"  # a space: quoting must hold
COMMAND = ["python", "-m", "hpctrain", "fit", "--config", f"{JOB_DIR}/config.yaml"]

# One full case per runtime (every option used), plus the variations that change the shape.
CASES: dict[str, tuple[str, dict]] = {
    name: (
        name,
        dict(
            gpus=True,
            binds=[JOB_DIR, "/datasets/imagenet:/data:ro"],
            env={"HPCTRAIN_LOG_LEVEL": "info"},
            pass_env=["HPCTRAIN_JOB_DIR", "MLFLOW_TRACKING_PASSWORD"],
            env_file=f"{JOB_DIR}/.env",
            auth_dir="/home/alice/.slurmflow/auth",
            workdir=JOB_DIR,
            cache_dir="/scratch/alice/images",
            insecure_registry=True,
        ),
    )
    for name in RUNTIMES
    if name != "none"
}
CASES["docker-cpu-minimal"] = ("docker", {})
CASES["podman-local-stack"] = (
    "podman",
    dict(run_args=["--runtime", "runc", "--ulimit", "nofile=20000:20000"], insecure_registry=True),
)
CASES["charliecloud-cpu"] = ("charliecloud", dict(binds=[JOB_DIR], workdir=JOB_DIR))
CASES["enroot-multinode"] = ("enroot", dict(launcher=["srun", "--ntasks-per-node=4", "--mpi=pmix"]))
CASES["apptainer-srun"] = ("apptainer", dict(launcher=["srun", "--kill-on-bad-exit=1"], gpus=True))
CASES["none"] = (
    "none",
    dict(env={"HPCTRAIN_LOG_LEVEL": "info"}, env_file=f"{JOB_DIR}/.env", workdir=JOB_DIR),
)
CASES["none-venv"] = ("none", dict(launcher=["srun"]))
# How the Slurm layer calls it: the job directory is only known to the job script ($SLURMFLOW_JOB_DIR),
# and the job's secrets (sourced from its mode-600 file) are handed over by name only.
JOB_VARS = dict(
    binds=["$SLURMFLOW_JOB_DIR", "/datasets:/data:ro"],
    workdir="$SLURMFLOW_JOB_DIR",
    env_file="${SLURMFLOW_JOB_DIR}/.env",
    pass_env=["SLURMFLOW_JOB_DIR", "HPCTRAIN_JOB_DIR", *JOB_SECRET_NAMES],
)
CASES["docker-job-vars"] = ("docker", JOB_VARS)
CASES["charliecloud-job-vars"] = ("charliecloud", JOB_VARS)
CASES["enroot-job-vars"] = ("enroot", JOB_VARS)


def _render(case: str) -> str:
    runtime, kwargs = CASES[case]
    image = "/opt/envs/hpctrain" if case == "none-venv" else (None if runtime == "none" else IMAGE)
    return container_command(runtime, image, COMMAND, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = _render(case)
    path = GOLDEN / f"{case}.sh"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with SLURMFLOW_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_fragment_is_valid_shell(case: str, shell: str) -> None:
    # dash: the fragment must not lean on bash-only syntax (the template is bash, sites vary).
    proc = subprocess.run([shell, "-n"], input=_render(case), text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_every_runtime_has_a_golden_case() -> None:
    assert {rt for rt, _ in CASES.values()} == set(RUNTIMES)


@pytest.mark.parametrize(
    ("runtime", "flag"),
    [
        ("docker", '--gpus "$sf_gpus"'),
        ("podman", "--device nvidia.com/gpu=all"),
        ("podman-hpc", "--gpu"),
        ("apptainer", "--nv"),
        ("singularity", "--nv"),
        ("charliecloud", 'ch-fromhost --nvidia "$sf_tmp"'),
    ],
)
def test_gpu_flags(runtime: str, flag: str) -> None:
    assert flag in container_command(runtime, IMAGE, ["nvidia-smi"], gpus=True)
    assert flag not in container_command(runtime, IMAGE, ["nvidia-smi"], gpus=False)


def test_enroot_runs_through_pyxis_with_the_cached_squashfs() -> None:
    text = container_command("pyxis", IMAGE, ["true"], gpus=True)
    assert text.rstrip().endswith('srun --container-image="$sf_img" true')
    assert f"docker://registry.example.org:5000#slurmflow/training@{DIGEST}" in text


def test_the_command_argv_survives_the_shell() -> None:
    nasty = ["printf", "%s|", "a b", "$(touch /tmp/pwned)", "it's", "`id`", ";", "*"]
    text = container_command("none", None, nasty)
    out = subprocess.run(["bash", "-c", text], text=True, capture_output=True, check=True).stdout
    assert out == "a b|$(touch /tmp/pwned)|it's|`id`|;|*|"


def test_caches_are_keyed_by_digest_without_colons() -> None:
    for runtime in ("charliecloud", "apptainer", "enroot"):
        text = container_command(runtime, IMAGE, ["true"], cache_dir="/c")
        assert f"sha256-{'3f' * 32}" in text
        assert "flock -w 3600 9" in text


def test_unpinned_images_are_refused() -> None:
    for runtime in ("docker", "podman", "charliecloud", "apptainer", "enroot", "podman-hpc"):
        with pytest.raises(ValueError, match="not pinned"):
            container_command(runtime, "registry.example.org/slurmflow/training:latest", ["true"])


def test_unknown_runtime_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown container runtime 'rkt'; valid: .*apptainer.*podman-hpc"):
        resolve_runtime("rkt")
    assert {resolve_runtime(a) for a in ALIASES} <= set(RUNTIMES)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(binds=["relative/path"]),
        dict(binds=["/a,b"]),
        dict(workdir="/x\n/y"),
        dict(env={"BAD-NAME": "x"}),
        dict(pass_env=["1X"]),
        dict(env_file="/a=b/.env"),
        dict(lock_timeout=0),
    ],
)
def test_invalid_options_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        container_command("docker", IMAGE, ["true"], **kwargs)


def test_enroot_needs_srun_and_none_cannot_remap_binds() -> None:
    with pytest.raises(ValueError, match="srun"):
        container_command("enroot", IMAGE, ["true"], launcher=["mpirun"])
    with pytest.raises(ValueError, match="no container"):
        container_command("none", None, ["true"], binds=["/a:/b"])


def test_bind_parse() -> None:
    assert Bind.parse("/a") == Bind("/a")
    assert Bind.parse("/a:/b:ro") == Bind("/a", "/b", True)
    assert Bind.parse("/a:rw") == Bind("/a", None, False)
    with pytest.raises(ValueError):
        Bind.parse("/a:/b:/c")


def test_secrets_never_appear_in_the_fragment() -> None:
    files = registry_auth_files("registry.example.org:5000", "alice", "s3cr3t-Pa55")
    for runtime in RUNTIMES:
        image = None if runtime == "none" else IMAGE
        text = container_command(runtime, image, ["true"], auth_dir="/home/alice/.auth", pass_env=["TOKEN"])
        assert "s3cr3t" not in text
        assert "YWxpY2U6czNjcjN0LVBhNTU" not in text  # base64 of the pair
    assert json.loads(files["config.json"])["auths"]["registry.example.org:5000"]["auth"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_job_secrets_are_named_never_assigned(runtime: str) -> None:
    """A training job's secrets reach every runtime by name: no ``NAME=`` anywhere in the fragment."""
    text = container_command(runtime, None if runtime == "none" else IMAGE, ["true"], pass_env=JOB_SECRET_NAMES)
    for name in JOB_SECRET_NAMES:
        assert f"{name}=" not in text
    if runtime in ("docker", "podman", "podman-hpc"):
        assert all(f"-e {name} " in text for name in JOB_SECRET_NAMES)


def test_registry_auth_files_formats() -> None:
    files = registry_auth_files("127.0.0.1:5000", "alice", "pw")
    assert files[".credentials"] == "machine 127.0.0.1 login alice password pw\n"
    assert "CH_IMAGE_PASSWORD=pw\n" in files["registry.env"]
    assert "APPTAINER_DOCKER_USERNAME=alice\n" in files["registry.env"]
    # netrc cannot carry a '$'-leading password (enroot would expand it): that file is left out.
    assert ".credentials" not in registry_auth_files("r.io", "alice", "$ecret")
    with pytest.raises(ValueError) as err:
        registry_auth_files("r.io", "alice", "pw\nINJECT=1")
    assert "INJECT" not in str(err.value)


def test_env_file_text() -> None:
    assert env_file_text({"A": "x y", "B": "$HOME"}) == "A=x y\nB=$HOME\n"
    with pytest.raises(ValueError, match="value of A"):
        env_file_text({"A": "line\nbreak"})
    with pytest.raises(ValueError, match="invalid environment variable name"):
        env_file_text({"A B": "x"})


def test_command_words_are_quoted_once() -> None:
    text = container_command("docker", IMAGE, ["echo", "$HOME"])
    assert text.rstrip().endswith(f'"$sf_image" echo {shlex.quote("$HOME")}')
