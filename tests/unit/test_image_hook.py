"""ImageBuildHook's decisions (build or not, push or not) with a fake daemon and registry.

The real build -> push -> lookup -> run chain is tests/integration/test_image_build.py; here a
fake docker-py client records what the hook asks of the daemon.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from docker.errors import ImageNotFound

from slurmflow.hooks.image import LABEL_CONTENT_HASH, ImageBuildError, ImageBuildHook
from slurmflow.images import BuildContext
from slurmflow.operators.image import BuildImageOperator

REGISTRY = "registry.test:5000"
BASE = f"{REGISTRY}/slurmflow/base:bookworm"
BASE_ID = "sha256:" + "b" * 64


class FakeRegistry:
    registry = REGISTRY

    def __init__(self) -> None:
        self.tags: dict[tuple[str, str], str] = {}
        self.checks = 0

    def check(self) -> None:
        self.checks += 1

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        return self.tags.get((repository, reference))

    def docker_auth_config(self) -> dict[str, str]:
        return {"username": "u", "password": "p", "serveraddress": REGISTRY}


class FakeClient:
    def __init__(
        self, registry: FakeRegistry, *, base_present: bool = True, fail_build: bool = False
    ) -> None:
        self.registry = registry
        self.images: dict[str, dict] = {BASE: {"Id": BASE_ID, "Config": {}}} if base_present else {}
        self.calls: list[tuple] = []
        self.fail_build = fail_build
        self.contexts: list[list[str]] = []

    def inspect_image(self, name: str) -> dict:
        if name not in self.images:
            raise ImageNotFound(name)
        return self.images[name]

    def pull(self, repository: str, tag: str, **kwargs):
        self.calls.append(("pull", f"{repository}:{tag}", kwargs.get("auth_config") is not None))
        self.images[f"{repository}:{tag}"] = {"Id": BASE_ID, "Config": {}}
        yield {"status": "Downloaded newer image"}

    def build(self, *, fileobj, tag: str, labels: dict, buildargs: dict, **kwargs):
        with tarfile.open(fileobj=fileobj) as tar:
            self.contexts.append(tar.getnames())
        self.calls.append(("build", tag, buildargs["BASE_IMAGE"]))
        yield {"stream": "Step 1/2 : FROM base\n"}
        if self.fail_build:
            yield {"stream": "ERROR: No matching distribution found for lightning\n"}
            yield {"error": "The command returned a non-zero code: 1", "errorDetail": {"message": "code 1"}}
            return
        self.images[tag] = {
            "Id": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),
            "Config": {"Labels": labels},
        }
        yield {"aux": {"ID": self.images[tag]["Id"]}}

    def push(self, repository: str, tag: str, auth_config: dict, **kwargs):
        self.calls.append(("push", f"{repository}:{tag}", auth_config["password"] == "p"))
        digest = "sha256:" + hashlib.sha256(f"{repository}:{tag}".encode()).hexdigest()
        self.registry.tags[(repository.split("/", 1)[1], tag)] = digest
        yield {"status": "Pushed"}
        yield {"aux": {"Tag": tag, "Digest": digest, "Size": 1}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for rel, text in {
        "docker/training.Dockerfile": "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n",
        "docker/requirements.lock": "torch==2.13.0+cpu\n",
        "training/src/hpctrain/__init__.py": "",
        "training/pyproject.toml": "[project]\nname = 'hpctrain'\n",
        "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl": "wheel",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def make_hook(**client_kw) -> tuple[ImageBuildHook, FakeClient, FakeRegistry]:
    registry = FakeRegistry()
    client = FakeClient(registry, **client_kw)
    hook = ImageBuildHook("registry_test")
    hook.__dict__["registry"] = registry  # cached_property slots: no connection, no daemon
    hook.__dict__["docker"] = type("D", (), {"api_client": client})()
    return hook, client, registry


def kinds(client: FakeClient) -> list[str]:
    return [c[0] for c in client.calls]


def test_unchanged_content_same_tag_and_no_build(project: Path) -> None:
    hook, client, _ = make_hook()
    first = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    second = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert (first.built, first.pushed) == (True, True)
    assert (second.built, second.pushed) == (False, False)
    assert (second.tag, second.digest, second.image) == (first.tag, first.digest, first.image)
    assert second.image == f"{REGISTRY}/slurmflow/training@{first.digest}"
    assert kinds(client) == ["build", "push"]


def test_code_change_gives_a_new_tag(project: Path) -> None:
    hook, client, _ = make_hook()
    first = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    (project / "training/src/hpctrain/__init__.py").write_text("VERSION = 2\n")
    second = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert second.tag != first.tag and second.built
    assert kinds(client) == ["build", "push", "build", "push"]


def test_build_context_holds_exactly_the_hashed_files_and_the_wheelhouse(project: Path) -> None:
    (project / "training/tests").mkdir()
    (project / "training/tests/test_x.py").write_text("")
    (project / "unrelated.txt").write_text("")
    hook, client, _ = make_hook()
    hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert sorted(client.contexts[0]) == [
        "docker/requirements.lock",
        "docker/training.Dockerfile",
        "training/pyproject.toml",
        "training/src/hpctrain/__init__.py",
        "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    ]


def test_image_built_earlier_but_not_pushed_is_pushed_without_a_rebuild(project: Path) -> None:
    hook, client, registry = make_hook()
    hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    registry.tags.clear()  # e.g. the push failed last time, or the registry was wiped
    again = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert (again.built, again.pushed) == (False, True)
    assert kinds(client) == ["build", "push", "push"]


def test_missing_base_image_is_pulled_with_the_registry_credentials(project: Path) -> None:
    hook, client, _ = make_hook(base_present=False)
    hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert client.calls[0] == ("pull", BASE, True)


def test_build_failure_carries_the_daemon_output(project: Path) -> None:
    hook, _, registry = make_hook(fail_build=True)
    with pytest.raises(
        ImageBuildError, match=r"(?s)build of .* failed: The command.*No matching distribution"
    ):
        hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    assert registry.tags == {}


def test_force_build_rebuilds(project: Path) -> None:
    hook, client, _ = make_hook()
    hook.ensure_image(BuildContext(project), "slurmflow/training", BASE)
    forced = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE, force_build=True)
    assert forced.built and kinds(client) == ["build", "push", "build", "push"]


def test_labels_carry_the_content_hash(project: Path) -> None:
    hook, client, _ = make_hook()
    result = hook.ensure_image(BuildContext(project), "slurmflow/training", BASE, labels={"git": "abc"})
    labels = client.images[f"{REGISTRY}/slurmflow/training:{result.tag}"]["Config"]["Labels"]
    assert labels[LABEL_CONTENT_HASH] == result.content_hash and labels["git"] == "abc"


def test_repository_must_be_in_the_connection_registry(project: Path) -> None:
    hook, _, _ = make_hook()
    assert str(hook.repository_ref(f"{REGISTRY}/team/app")) == f"{REGISTRY}/team/app"
    with pytest.raises(ValueError, match="must be a path in registry"):
        hook.repository_ref("other.io/team/app")


def test_operator_returns_the_pinned_image_and_pushes_xcom(project: Path) -> None:
    hook, _, _ = make_hook()
    op = BuildImageOperator(task_id="build_image", context_dir=str(project), base_image=BASE)
    op.__dict__["hook"] = hook

    class TI:
        pushed: dict = {}

        def xcom_push(self, key: str, value: object) -> None:
            self.pushed[key] = value

    ti = TI()
    image = op.execute({"ti": ti})
    assert image.startswith(f"{REGISTRY}/slurmflow/training@sha256:")
    assert ti.pushed["digest"] == image.split("@")[1]
    assert ti.pushed["built"] is True and len(ti.pushed["tag"]) == 32
