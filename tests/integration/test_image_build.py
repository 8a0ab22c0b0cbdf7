"""Content-addressed build -> push -> registry lookup, against the local stack's dockerd and registry.

The build inputs are snapshotted once per module (training/ is edited concurrently by others;
a snapshot keeps "unchanged content" unchanged), and the training image is built once from it:
later calls take the unchanged-content path. The wheelhouse is prepared first if missing
(scripts/wheelhouse.sh, offline when it already exists) and hard-linked into the snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurmflow.hooks.image import ImageBuildHook, ImageResult
from slurmflow.hooks.registry import RegistryAuthError, RegistryHook, RegistryUnavailableError
from slurmflow.images import DEFAULT_EXCLUDES, BuildContext

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REPOSITORY = "slurmflow/training"
CONN_ID = "registry_itest"


def _conn_env(conn_id: str, host: str, login: str, password: str) -> tuple[str, str]:
    value = json.dumps({"conn_type": "docker", "host": host, "login": login, "password": password})
    return f"AIRFLOW_CONN_{conn_id.upper()}", value


@pytest.fixture(scope="module")
def registry_conn(stack_env: dict[str, str]) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            *_conn_env(
                CONN_ID, stack_env["REGISTRY"], stack_env["REGISTRY_USER"], stack_env["REGISTRY_PASSWORD"]
            )
        )
        yield CONN_ID


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    path = REPO / "wheelhouse"
    if not any(path.glob("torch-*.whl")):
        subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=True, timeout=900)
    return path


def copy_context(dst: Path, src: Path = REPO) -> BuildContext:
    """A private copy of the build inputs; the wheelhouse is hard-linked (300 MB, no copy)."""
    ignore = shutil.ignore_patterns(*DEFAULT_EXCLUDES)
    shutil.copytree(src / "training", dst / "training", ignore=ignore)
    (dst / "docker").mkdir()
    for name in ("training.Dockerfile", "requirements.lock"):
        shutil.copy2(src / "docker" / name, dst / "docker" / name)
    shutil.copytree(src / "wheelhouse", dst / "wheelhouse", copy_function=os.link)
    return BuildContext(dst)


@pytest.fixture(scope="module")
def snapshot(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildContext:
    return copy_context(tmp_path_factory.mktemp("image-context"))


@pytest.fixture(scope="module")
def built(registry_conn: str, snapshot: BuildContext, stack_env: dict[str, str]) -> ImageResult:
    """The training image of the snapshot, in the registry (built here if it was not)."""
    return ImageBuildHook(registry_conn).ensure_image(snapshot, REPOSITORY, stack_env["BASE_IMAGE"])


def _local(hook: ImageBuildHook, result: ImageResult) -> dict:
    """``docker inspect`` of the image, pulled by digest first if the daemon lacks the reference
    (another test session on the same daemon may have removed it)."""
    from docker.errors import ImageNotFound

    try:
        return hook.client.inspect_image(result.image)
    except ImageNotFound:
        name = result.image.split("@")[0]
        auth = hook.registry.docker_auth_config()
        list(hook.client.pull(name, tag=result.digest, stream=True, decode=True, auth_config=auth))
        return hook.client.inspect_image(result.image)


def _layers(hook: ImageBuildHook, result: ImageResult) -> list[str]:
    return _local(hook, result)["RootFS"]["Layers"]


def test_build_push_and_registry_lookup(built: ImageResult, registry_conn: str, stack_env: dict) -> None:
    assert built.image == f"{stack_env['REGISTRY']}/{REPOSITORY}@{built.digest}"
    # The registry serves the digest under the content tag and under the digest itself.
    registry = RegistryHook(registry_conn)
    assert registry.manifest_digest(REPOSITORY, built.tag) == built.digest
    assert registry.manifest_digest(REPOSITORY, built.digest) == built.digest


def test_unchanged_content_same_tag_no_build_under_two_seconds(
    built: ImageResult,
    snapshot: BuildContext,
    registry_conn: str,
    stack_env: dict,
    capfd: pytest.CaptureFixture,
) -> None:
    hook = ImageBuildHook(registry_conn)
    again = hook.ensure_image(snapshot, REPOSITORY, stack_env["BASE_IMAGE"])
    assert (again.built, again.pushed) == (False, False)
    assert (again.tag, again.digest) == (built.tag, built.digest)
    assert again.seconds < 2.0
    logged = "".join(capfd.readouterr())
    assert "nothing to build" in logged  # the hook's log lines are where capfd looks
    assert stack_env["REGISTRY_PASSWORD"] not in logged


def test_image_runs_the_training_cli_as_non_root(built: ImageResult, registry_conn: str) -> None:
    _local(ImageBuildHook(registry_conn), built)
    proc = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            built.image,
            "sh",
            "-c",
            'id -u; python -c "import torch, hpctrain; print(torch.__version__)"; python -m hpctrain --help',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    uid, torch_version, *help_lines = proc.stdout.splitlines()
    assert uid != "0"
    assert torch_version.startswith("2.13.0")
    assert any("fit" in line for line in help_lines)


def test_code_change_new_tag_and_only_the_code_layers_rebuilt(
    built: ImageResult, snapshot: BuildContext, registry_conn: str, stack_env: dict, tmp_path: Path
) -> None:
    context = copy_context(tmp_path, src=snapshot.root)
    hook = ImageBuildHook(registry_conn)
    # Same content in another folder: same tag (paths are relative, mtimes do not count).
    assert hook.plan(context, REPOSITORY, stack_env["BASE_IMAGE"]).ref.tag == built.tag
    init = tmp_path / "training" / "src" / "hpctrain" / "__init__.py"
    init.write_text(init.read_text() + f"\n# integration test change {time.time_ns()}\n")
    changed = hook.ensure_image(context, REPOSITORY, stack_env["BASE_IMAGE"])
    assert changed.tag != built.tag and (changed.built, changed.pushed) == (True, True)
    assert changed.digest != built.digest
    old_layers, new_layers = _layers(hook, built), _layers(hook, changed)
    # Base, user and the 1.4 GB dependency venv are shared; only the code layers (copy + install) differ.
    assert len(new_layers) == len(old_layers)
    assert new_layers[:-2] == old_layers[:-2]
    assert new_layers[-2:] != old_layers[-2:]


def test_registry_down_is_a_clear_error(stack_env: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*_conn_env("registry_down", f"127.0.0.1:{port}", "slurmflow", "irrelevant-pw-1"))
        started = time.monotonic()
        with pytest.raises(
            RegistryUnavailableError, match=rf"registry 127.0.0.1:{port} is unreachable"
        ) as err:
            ImageBuildHook("registry_down").ensure_image(
                BuildContext(REPO), REPOSITORY, stack_env["BASE_IMAGE"]
            )
    assert "Connection refused" in str(err.value)
    assert "irrelevant-pw-1" not in str(err.value)
    assert time.monotonic() - started < 10


def test_wrong_credentials_clear_error_without_the_password(
    stack_env: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    wrong = "not-the-Password-" + os.urandom(4).hex()
    caplog.set_level(logging.DEBUG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*_conn_env("registry_wrong", stack_env["REGISTRY"], stack_env["REGISTRY_USER"], wrong))
        with pytest.raises(RegistryAuthError) as err:
            ImageBuildHook("registry_wrong").ensure_image(
                BuildContext(REPO), REPOSITORY, stack_env["BASE_IMAGE"]
            )
    message = str(err.value)
    assert "rejected the credentials" in message and "registry_wrong" in message
    logged = caplog.text + "".join(capfd.readouterr())  # Airflow's loggers write to the streams
    for text in (message, repr(err.value.__cause__), repr(err.value.__context__), logged):
        assert wrong not in text
        assert stack_env["REGISTRY_PASSWORD"] not in text
