"""Content hashing, tags, image references and the build context (pure helpers)."""

from __future__ import annotations

import io
import os
import re
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from slurmflow.images import (
    DEFAULT_EXCLUDES,
    BuildContext,
    ImageRef,
    ImageRefError,
    content_hash,
    content_tag,
    parse_image_ref,
    write_context_tar,
)

REPO = Path(__file__).resolve().parents[2]
BASE_ID = "sha256:" + "b" * 64


@pytest.fixture
def ctx(tmp_path: Path) -> BuildContext:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "training.Dockerfile").write_text("FROM x\n")
    (tmp_path / "docker" / "requirements.lock").write_text("torch==2.13.0+cpu\n")
    pkg = tmp_path / "training" / "src" / "hpctrain"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fit.py").write_text("print('fit')\n")
    (tmp_path / "training" / "pyproject.toml").write_text("[project]\nname='hpctrain'\n")
    # Noise that must not count: caches, tests, local runs, a virtualenv.
    for junk in (
        "src/hpctrain/__pycache__/fit.cpython-311.pyc",
        "tests/test_x.py",
        "lightning_logs/v0/m",
        ".venv/bin/python",
        "src/hpctrain.egg-info/PKG-INFO",
    ):
        path = tmp_path / "training" / junk
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("junk")
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    return BuildContext(tmp_path)


def _hash(ctx: BuildContext, **kw) -> str:
    return content_hash(ctx.root, ctx.content_files(), base_image_id=kw.pop("base", BASE_ID), **kw)


def test_content_files_are_the_image_inputs_only(ctx: BuildContext) -> None:
    assert ctx.content_files() == [
        "docker/requirements.lock",
        "docker/training.Dockerfile",
        "training/pyproject.toml",
        "training/src/hpctrain/__init__.py",
        "training/src/hpctrain/fit.py",
    ]
    assert ctx.wheelhouse_files() == ["wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]


def test_same_content_same_hash_and_noise_does_not_count(ctx: BuildContext) -> None:
    first = _hash(ctx)
    (ctx.root / "training" / "tests" / "test_x.py").write_text("changed")
    (ctx.root / "training" / "src" / "hpctrain" / "__pycache__" / "new.pyc").write_text("x")
    (ctx.root / "wheelhouse" / "extra.whl").write_text("x")  # the lock decides the deps, not the folder
    os.utime(ctx.root / "training" / "src" / "hpctrain" / "fit.py", (1, 1))  # mtime is not content
    assert _hash(ctx) == first


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "training/src/hpctrain/fit.py").write_text("print('new')\n"),
        lambda root: (root / "training/src/hpctrain/new.py").write_text(""),
        lambda root: (root / "training/src/hpctrain/fit.py").rename(root / "training/src/hpctrain/fit2.py"),
        lambda root: (root / "training/src/hpctrain/fit.py").chmod(0o755),
        lambda root: (root / "docker/requirements.lock").write_text("torch==2.13.0+cpu\nlightning==2.6.6\n"),
        lambda root: (root / "docker/training.Dockerfile").write_text("FROM y\n"),
    ],
    ids=["code-edit", "code-add", "code-rename", "exec-bit", "lock", "dockerfile"],
)
def test_any_input_change_changes_the_hash(ctx: BuildContext, change) -> None:
    before = _hash(ctx)
    change(ctx.root)
    assert _hash(ctx) != before


def test_a_config_only_change_keeps_the_image(ctx: BuildContext) -> None:
    """Experiment configs travel with each job (slurmflow.pipeline.experiments), not in the image:
    adding or editing one changes neither the files sent to the daemon nor the tag."""
    configs = ctx.root / "training" / "configs"
    configs.mkdir()
    (configs / "mine.yaml").write_text("seed_everything: 1\n")
    before, files = _hash(ctx), ctx.content_files()
    assert not any(f.startswith("training/configs") for f in files)
    (configs / "mine.yaml").write_text("seed_everything: 2\n")
    (configs / "ecg.yaml").write_text("trainer: {max_epochs: 3}\n")
    assert _hash(ctx) == before and ctx.content_files() == files
    # ...while a package module named configs still counts (only the repository's folder is left out)
    (ctx.root / "training" / "src" / "hpctrain" / "configs.py").write_text("")
    assert _hash(ctx) != before


def test_base_image_id_and_build_args_count_but_not_the_base_name(ctx: BuildContext) -> None:
    before = _hash(ctx)
    assert _hash(ctx, base="sha256:" + "c" * 64) != before
    assert _hash(ctx, build_args={"HPC_UID": "2000"}) != before
    assert _hash(ctx, build_args={"BASE_IMAGE": "other:name"}) == before
    with pytest.raises(ValueError, match="base_image_id"):
        content_hash(ctx.root, [], base_image_id="")


def test_content_tag() -> None:
    assert content_tag("a" * 64) == "a" * 32
    with pytest.raises(ValueError):
        content_tag("xyz")


def test_missing_inputs_are_named(ctx: BuildContext) -> None:
    (ctx.root / "docker" / "requirements.lock").unlink()
    with pytest.raises(FileNotFoundError, match="requirements.lock"):
        ctx.content_files()
    with pytest.raises(FileNotFoundError, match="wheelhouse.sh"):
        BuildContext(ctx.root, wheelhouse="nowhere").wheelhouse_files()
    with pytest.raises(ValueError, match="inside the build context"):
        BuildContext(ctx.root, code_paths=("../elsewhere",))


def test_context_tar_is_deterministic(ctx: BuildContext) -> None:
    files = ctx.content_files() + ctx.wheelhouse_files()
    first, second = io.BytesIO(), io.BytesIO()
    assert write_context_tar(ctx.root, files, first) == len(files)
    os.utime(ctx.root / "training" / "src" / "hpctrain" / "fit.py", (5, 5))
    write_context_tar(ctx.root, files, second)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(files)
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 0)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/slurmflow/training:abc", ImageRef("127.0.0.1:5000", "slurmflow/training", "abc")),
        ("localhost/x", ImageRef("localhost", "x")),
        ("python:3.11-slim-bookworm", ImageRef("docker.io", "library/python", "3.11-slim-bookworm")),
        ("ghcr.io/org/img@sha256:" + "0" * 64, ImageRef("ghcr.io", "org/img", None, "sha256:" + "0" * 64)),
        ("org/img:t@sha256:" + "1" * 64, ImageRef("docker.io", "org/img", "t", "sha256:" + "1" * 64)),
    ],
)
def test_parse_image_ref(text: str, expected: ImageRef) -> None:
    assert parse_image_ref(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "UPPER/case", "a b", "x@sha256:short", "x:bad/tag", "reg:5000/x:" + "t" * 200]
)
def test_parse_image_ref_rejects(bad: str) -> None:
    with pytest.raises(ImageRefError):
        parse_image_ref(bad)


def test_pinned_refs() -> None:
    ref = parse_image_ref("127.0.0.1:5000/slurmflow/training:abc")
    with pytest.raises(ImageRefError, match="not pinned"):
        ref.pinned()
    digest = "sha256:" + "e" * 64
    assert ref.with_digest(digest).pinned() == f"127.0.0.1:5000/slurmflow/training@{digest}"
    assert str(ref.with_tag("t2")) == "127.0.0.1:5000/slurmflow/training:t2"


def test_dockerignore_mirrors_the_default_excludes() -> None:
    """CLI builds (BuildKit reads docker/training.Dockerfile.dockerignore) leave out what the hook does."""
    ignore = (REPO / "docker" / "training.Dockerfile.dockerignore").read_text()
    for pattern in DEFAULT_EXCLUDES:
        if pattern in (".git", "dist", "build", "tests"):
            continue  # covered by the leading `**` or by an explicit training/... line
        if "/" in pattern:  # a path of the repository, not a name anywhere
            assert re.search(rf"^{re.escape(pattern)}/?$", ignore, re.M), pattern
            continue
        assert re.search(rf"\*\*/{re.escape(pattern)}/?$", ignore, re.M), pattern


def test_dockerfile_default_base_matches_the_operator_default() -> None:
    from slurmflow.images import DEFAULT_BASE_IMAGE

    dockerfile = (REPO / "docker" / "training.Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={DEFAULT_BASE_IMAGE}\n" in dockerfile


def test_the_image_lock_covers_the_training_dependencies() -> None:
    """docker/requirements.lock pins every dependency of training/ (and its build backend) in range.

    Fails when training/pyproject.toml gains or narrows a dependency: run
    ``scripts/wheelhouse.sh --lock`` and commit the new lock.
    """
    lock = (REPO / "docker" / "requirements.lock").read_text()
    pins = {
        canonicalize_name(m.group(1)): Version(m.group(2))
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock, re.M)
    }
    project = tomllib.loads((REPO / "training" / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, (
            f"{req.name} is not in docker/requirements.lock: run scripts/wheelhouse.sh --lock"
        )
        # torch's lock entry is the local CPU build (2.13.0+cpu), which `==2.13.0` accepts.
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} not in {req.specifier}"
        )
    assert str(pins["torch"]).startswith("2.13.0")


def test_source_revision_reads_sha_and_dirty_flag(tmp_path):
    import subprocess

    from slurmflow.images import code_version, source_revision

    assert source_revision(tmp_path) == {"git_sha": None, "git_dirty": None}
    assert code_version(source_revision(tmp_path)) == "unknown"
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    rev = source_revision(tmp_path)
    assert len(rev["git_sha"]) == 40 and rev["git_dirty"] is False and code_version(rev) == rev["git_sha"]
    (tmp_path / "untracked.txt").write_text("x")  # not part of the build context: still clean
    assert source_revision(tmp_path)["git_dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert code_version(source_revision(tmp_path)) == f"{rev['git_sha']}-dirty"
