"""Images by content: which files make the training image, their hash, and image references.

Pure helpers (local files only, no network, no Airflow imports). The tag of the training image
is a hash of everything that decides its content: the Dockerfile, the training code, the locked
dependencies and the *id* of the base image (its name can move, its id cannot), plus the build
args. The build context sent to the Docker daemon is built from the very same file list, so a
file that does not change the tag cannot change the image either.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

# DEFAULT_BASE_IMAGE: the Dockerfile's own ``ARG BASE_IMAGE`` default; DEFAULT_EXCLUDES: what is
# never part of the image. Defined in slurmflow.constants (the operator needs them at DAG parse).
from slurmflow.constants import DEFAULT_BASE_IMAGE, DEFAULT_EXCLUDES  # noqa: F401 (re-exported)

#: Bumped when the hashing recipe changes, so old tags are never mistaken for new ones.
HASH_SCHEME = "slurmflow-image-v1"
#: Characters of the sha256 hex digest kept in the tag: 128 bits, well clear of collisions.
TAG_HEX_CHARS = 32

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Docker's reference grammar, reduced to what we need: lowercase path components, a tag and/or digest.
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
_REGISTRY_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DOCKER_HUB = "docker.io"


class ImageRefError(ValueError):
    """An image reference that does not follow the registry/repository[:tag][@digest] grammar."""


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference.

    :param registry: ``host[:port]`` of the registry (``docker.io`` for Docker Hub).
    :param repository: path inside the registry, e.g. ``slurmflow/training``.
    :param tag: tag, or None.
    :param digest: ``sha256:<64 hex>`` manifest digest, or None.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What the registry API calls the reference: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self) -> str:
        """``registry/repository@sha256:...``: the only form jobs may run.

        :raises ImageRefError: when no digest is known.
        """
        if not self.digest:
            raise ImageRefError(f"{self} is not pinned by digest; jobs must use image@sha256:...")
        return f"{self.name}@{self.digest}"

    def with_tag(self, tag: str) -> ImageRef:
        """This reference with another tag (and no digest)."""
        if not _TAG_RE.match(tag):
            raise ImageRefError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageRef:
        """This reference pinned to ``digest``."""
        if not DIGEST_RE.match(digest):
            raise ImageRefError(f"invalid digest {digest!r}: expected sha256:<64 hex>")
        return replace(self, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_image_ref(ref: str) -> ImageRef:
    """Parse ``[registry/]repository[:tag][@digest]`` the way Docker does.

    The first path component is a registry when it contains ``.`` or ``:`` or is ``localhost``;
    otherwise the image lives on Docker Hub (single names get the ``library/`` prefix).

    :param ref: the reference, e.g. ``127.0.0.1:5000/slurmflow/training@sha256:...``.
    :raises ImageRefError: when ``ref`` is not a valid reference.
    """
    if not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise ImageRefError(f"invalid image reference {ref!r}")
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise ImageRefError(f"invalid digest in {ref!r}: expected sha256:<64 hex>")
    tag = None
    last_slash = rest.rfind("/")
    if ":" in rest[last_slash + 1 :]:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ImageRefError(f"invalid tag in {ref!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
        if not _REGISTRY_RE.match(registry):
            raise ImageRefError(f"invalid registry {registry!r} in {ref!r}")
    else:
        registry, repository = _DOCKER_HUB, rest if "/" in rest else f"library/{rest}"
    if not _REPO_RE.match(repository):
        raise ImageRefError(f"invalid repository {repository!r} in {ref!r}")
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


@dataclass(frozen=True)
class BuildContext:
    """What goes into the training image, relative to one context folder (the repository root).

    :param root: the build context folder; every other path is relative to it.
    :param dockerfile: the Dockerfile.
    :param lock_file: the locked dependencies the image installs.
    :param code_paths: folders (or files) of code copied into the image.
    :param wheelhouse: folder of wheels for ``lock_file``, prepared outside the build. It is sent
        with the context but not hashed: the lock file (with hashes) already decides its content.
    :param excludes: glob patterns left out of ``code_paths``.
    """

    root: Path
    dockerfile: str = "docker/training.Dockerfile"
    lock_file: str = "docker/requirements.lock"
    code_paths: tuple[str, ...] = ("training",)
    wheelhouse: str | None = "wheelhouse"
    excludes: tuple[str, ...] = field(default=DEFAULT_EXCLUDES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())
        object.__setattr__(self, "code_paths", tuple(self.code_paths))
        object.__setattr__(self, "excludes", tuple(self.excludes))
        for rel in (self.dockerfile, self.lock_file, *self.code_paths, self.wheelhouse or "."):
            _check_relative(rel)

    def content_files(self) -> list[str]:
        """The files that decide the image: Dockerfile, lock file and code, sorted, POSIX paths.

        :raises FileNotFoundError: when the Dockerfile, the lock file or a code path is missing.
        """
        files = {self.dockerfile, self.lock_file}
        for rel in (self.dockerfile, self.lock_file):
            if not (self.root / rel).is_file():
                raise FileNotFoundError(f"{self.root / rel} does not exist")
        for rel in self.code_paths:
            files.update(_walk(self.root, rel, self.excludes))
        return sorted(files)

    def wheelhouse_files(self) -> list[str]:
        """The wheels sent with the context (empty when there is no wheelhouse)."""
        if not self.wheelhouse:
            return []
        if not (self.root / self.wheelhouse).is_dir():
            raise FileNotFoundError(
                f"wheelhouse {self.root / self.wheelhouse} not found: run scripts/wheelhouse.sh first"
            )
        return sorted(_walk(self.root, self.wheelhouse, ()))


def _check_relative(rel: str) -> None:
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{rel!r} must be a path inside the build context")


def _excluded(rel: str, name: str, excludes: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(rel, pat) for pat in excludes)


def _walk(root: Path, rel: str, excludes: Sequence[str]) -> Iterable[str]:
    top = root / rel
    if top.is_file() or top.is_symlink():
        yield Path(rel).as_posix()
        return
    if not top.is_dir():
        raise FileNotFoundError(f"{top} does not exist")
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        base = Path(dirpath).relative_to(root)
        # Prune in place so excluded trees (a 2 GB .venv, say) are never even listed.
        dirnames[:] = sorted(d for d in dirnames if not _excluded((base / d).as_posix(), d, excludes))
        for name in filenames:
            path = (base / name).as_posix()
            if not _excluded(path, name, excludes):
                yield path
        # os.walk reports symlinks to directories in dirnames; they are files to tar.
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink():
                dirnames.remove(d)
                yield (base / d).as_posix()


def _file_record(root: Path, rel: str) -> str:
    path = root / rel
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"L {rel} {os.readlink(path)}"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    # Only the executable bit: git keeps nothing else, so checkouts on two machines agree.
    kind = "X" if st.st_mode & 0o111 else "F"
    return f"{kind} {rel} {h.hexdigest()}"


def content_hash(
    root: Path | str,
    files: Sequence[str],
    *,
    base_image_id: str,
    build_args: Mapping[str, str] | None = None,
) -> str:
    """sha256 hex over the files' paths, contents and exec bits, the base image id and build args.

    :param root: folder the relative ``files`` live in.
    :param files: relative POSIX paths (see :meth:`BuildContext.content_files`).
    :param base_image_id: the base image's content id (``sha256:...``), not its name.
    :param build_args: build args other than ``BASE_IMAGE`` (which ``base_image_id`` stands for).
    """
    if not base_image_id:
        raise ValueError("base_image_id is required: the base image is part of the content")
    root = Path(root)
    h = hashlib.sha256()
    h.update(f"{HASH_SCHEME}\nbase {base_image_id}\n".encode())
    for key, value in sorted((build_args or {}).items()):
        if key != "BASE_IMAGE":
            h.update(f"arg {key}={value}\n".encode())
    for rel in sorted(set(files)):
        h.update(_file_record(root, rel).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def content_tag(hexdigest: str) -> str:
    """The image tag for a :func:`content_hash`: its first :data:`TAG_HEX_CHARS` hex characters."""
    if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ValueError(f"not a sha256 hex digest: {hexdigest!r}")
    return hexdigest[:TAG_HEX_CHARS]


def write_context_tar(root: Path | str, files: Iterable[str], out: BinaryIO) -> int:
    """Write a deterministic, uncompressed tar of ``files`` (relative to ``root``) to ``out``.

    Owner, group and mtime are fixed so the same files always give the same bytes; the daemon's
    layer cache then hits on content alone.

    :returns: the number of members written.
    """
    import tarfile  # deferred: only builds need it, and DAG files import this module at parse time

    root = Path(root)
    count = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(set(files)):
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isreg():
                info.mode = 0o755 if info.mode & 0o111 else 0o644
                with open(root / rel, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
            count += 1
    return count


def source_revision(root: Path | str) -> dict[str, Any]:
    """The git revision the image is built from: ``{"git_sha", "git_dirty"}``.

    ``git_dirty`` is True when tracked files differ from the commit (untracked files do not
    count: they are not part of the hashed build context unless listed there). Outside a git
    checkout, or without ``git``, both are ``None``: the content tag still identifies the code.
    The image's content tag, not the SHA, decides rebuilds: a docs-only commit reuses the image.
    """
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "--verify", "HEAD")
    if head is None or head.returncode != 0:
        return {"git_sha": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"git_sha": head.stdout.strip(), "git_dirty": dirty}


def code_version(revision: Mapping[str, Any]) -> str:
    """One string for the run, the model version and the catalog: ``<sha>[-dirty]`` or ``unknown``."""
    sha = revision.get("git_sha")
    if not sha:
        return "unknown"
    return f"{sha}-dirty" if revision.get("git_dirty") else str(sha)
