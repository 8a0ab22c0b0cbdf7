"""Build the training image by content, push it, and answer with its digest.

The flow of :meth:`ImageBuildHook.ensure_image`:

1. ask the registry (``GET /v2/``) so a down registry or bad credentials fail first, clearly;
2. resolve the base image to its id (pulled once if the daemon lacks it) and hash the content
   (:mod:`slurmflow.images`): tag = content hash;
3. ``HEAD`` the tag's manifest: present -> done, no build (the unchanged-content path);
4. otherwise build (the daemon's layer cache makes a code-only change cheap), push, and read
   the manifest digest back from the registry.

The Docker daemon is reached through the docker provider's :class:`DockerHook` (docker-py's
``APIClient``), which also logs the daemon in to the registry from the same connection.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.common.compat.sdk import AirflowException, BaseHook

from slurmflow.hooks.registry import RegistryHook
from slurmflow.images import (
    BuildContext,
    ImageRef,
    content_hash,
    content_tag,
    parse_image_ref,
    write_context_tar,
)

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
#: Label keys the hook writes on every image it builds.
LABEL_CONTENT_HASH = "io.slurmflow.content-hash"
LABEL_BASE_ID = "io.slurmflow.base-image-id"


class ImageBuildError(AirflowException):
    """The build or the push failed; the message carries the daemon's own last lines."""


@dataclass(frozen=True)
class ImagePlan:
    """What :meth:`ImageBuildHook.plan` decided: the content tag of the image to have.

    :param ref: ``registry/repository:tag`` (tag = content hash).
    :param content_hash: full sha256 hex of the content.
    :param base_image: the base image reference passed as ``BASE_IMAGE``.
    :param base_image_id: its content id, part of the hash.
    :param files: the hashed files, relative to the context root.
    """

    ref: ImageRef
    content_hash: str
    base_image: str
    base_image_id: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class ImageResult:
    """Outcome of :meth:`ImageBuildHook.ensure_image` (plain values: it goes to XCom).

    :param image: ``registry/repository@sha256:...``, what jobs run.
    :param digest: the manifest digest.
    :param tag: the content tag.
    :param content_hash: full content hash.
    :param built: False when the registry already had the tag (nothing was built or pushed).
    :param pushed: whether this call pushed.
    :param base_image_id: id of the base image the tag was computed with.
    :param seconds: wall time of the call.
    """

    image: str
    digest: str
    tag: str
    content_hash: str
    built: bool
    pushed: bool
    base_image_id: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageBuildHook(BaseHook):
    """Content-addressed build and push of the training image.

    :param registry_conn_id: Airflow connection (type ``docker``) of the registry to push to.
    :param docker_url: Docker daemon socket/URL; default ``$DOCKER_HOST`` or the local socket.
    :param build_timeout: seconds the daemon may stay silent during a build or push step
        (installing torch prints nothing for a while).
    """

    conn_name_attr = "registry_conn_id"
    default_conn_name = "registry_default"
    conn_type = "docker"
    hook_name = "Training image build (content-addressed)"

    def __init__(
        self,
        registry_conn_id: str = default_conn_name,
        docker_url: str | None = None,
        *,
        build_timeout: int = 1800,
    ) -> None:
        super().__init__()
        self.registry_conn_id = registry_conn_id
        self.docker_url = docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        self.build_timeout = build_timeout

    @cached_property
    def registry(self) -> RegistryHook:
        return RegistryHook(self.registry_conn_id)

    @cached_property
    def docker(self) -> Any:
        """The provider's DockerHook; it pings the daemon and logs it in to the registry."""
        from airflow.providers.docker.hooks.docker import DockerHook  # heavy: only when used

        return DockerHook(
            docker_conn_id=self.registry_conn_id,
            base_url=self.docker_url,
            version="auto",
            timeout=self.build_timeout,
        )

    @property
    def client(self) -> Any:
        """docker-py ``APIClient`` of the daemon."""
        return self.docker.api_client

    # --- pieces -------------------------------------------------------------------------------
    def repository_ref(self, repository: str) -> ImageRef:
        """``repository`` (``slurmflow/training`` or ``<registry>/slurmflow/training``) in our registry."""
        registry = self.registry.registry
        first = repository.split("/", 1)[0]
        has_registry = "." in first or ":" in first or first == "localhost"
        ref = parse_image_ref(repository if has_registry else f"{registry}/{repository}")
        if ref.registry != registry or ref.tag or ref.digest:
            raise ValueError(f"repository {repository!r} must be a path in registry {registry} without a tag")
        return ref

    def base_image_id(self, base_image: str) -> str:
        """Content id of ``base_image`` in the daemon, pulled first when missing.

        The id, not a registry digest, goes into the hash: it is what the build really uses
        (``pull=False``), and it is the same on every machine that has the same image.
        """
        from docker.errors import ImageNotFound

        try:
            return self.client.inspect_image(base_image)["Id"]
        except ImageNotFound:
            pass
        ref = parse_image_ref(base_image)
        auth = self.registry.docker_auth_config() if ref.registry == self.registry.registry else None
        self.log.info("Base image %s is not in the daemon: pulling it", base_image)
        self._stream(
            self.client.pull(
                f"{ref.name}",
                tag=ref.digest or ref.tag or "latest",
                stream=True,
                decode=True,
                auth_config=auth,
            ),
            what=f"pull of base image {base_image}",
        )
        return self.client.inspect_image(base_image)["Id"]

    def plan(
        self,
        context: BuildContext,
        repository: str,
        base_image: str,
        build_args: Mapping[str, str] | None = None,
    ) -> ImagePlan:
        """Hash the content and name the tag; no build, no push."""
        files = context.content_files()
        base_id = self.base_image_id(base_image)
        digest = content_hash(context.root, files, base_image_id=base_id, build_args=build_args)
        return ImagePlan(
            ref=self.repository_ref(repository).with_tag(content_tag(digest)),
            content_hash=digest,
            base_image=base_image,
            base_image_id=base_id,
            files=tuple(files),
        )

    def build(
        self,
        context: BuildContext,
        plan: ImagePlan,
        *,
        build_args: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        no_cache: bool = False,
    ) -> str:
        """Build ``plan.ref`` from exactly the hashed files plus the wheelhouse; return the image id.

        :param no_cache: ignore the daemon's layer cache (a cold build).
        """
        files = [*plan.files, *context.wheelhouse_files()]
        all_labels = {
            LABEL_CONTENT_HASH: plan.content_hash,
            LABEL_BASE_ID: plan.base_image_id,
            "org.opencontainers.image.base.name": plan.base_image,
            **(labels or {}),
        }
        with tempfile.TemporaryFile(prefix="slurmflow-context-") as tar:
            write_context_tar(context.root, files, tar)
            size_mb = tar.tell() / 2**20
            tar.seek(0)
            self.log.info("Building %s (context %.0f MiB, %d files)", plan.ref, size_mb, len(files))
            stream = self.client.build(
                fileobj=tar,
                custom_context=True,
                dockerfile=context.dockerfile,
                tag=str(plan.ref),
                buildargs={**(build_args or {}), "BASE_IMAGE": plan.base_image},
                labels=all_labels,
                pull=False,  # the base is pinned by id in the hash; never let it move under us
                nocache=no_cache,
                rm=True,
                forcerm=True,
                decode=True,
                timeout=self.build_timeout,
            )
            image_id = self._stream(stream, what=f"build of {plan.ref}")
        return image_id or self.client.inspect_image(str(plan.ref))["Id"]

    def push(self, ref: ImageRef) -> str:
        """Push ``ref`` (a tag) and return the manifest digest the registry now serves for it."""
        self.log.info("Pushing %s", ref)
        stream = self.client.push(
            ref.name, tag=ref.tag, stream=True, decode=True, auth_config=self.registry.docker_auth_config()
        )
        pushed = self._stream(stream, what=f"push of {ref}", aux_key="Digest")
        served = self.registry.manifest_digest(ref.repository, ref.tag or "latest")
        if not served:
            raise ImageBuildError(f"push of {ref} finished but the registry does not list the tag")
        if pushed and pushed != served:
            # Someone pushed the same content tag in between; both manifests hold the same content.
            self.log.warning("Registry serves %s for %s, our push reported %s", served, ref, pushed)
        return served

    def _stream(self, chunks: Iterator[dict[str, Any]], *, what: str, aux_key: str = "ID") -> str | None:
        """Log a daemon progress stream; raise with its last lines on error; return an aux value."""
        tail: deque[str] = deque(maxlen=25)
        aux_value = None
        for chunk in chunks:
            if "error" in chunk or "errorDetail" in chunk:
                message = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "unknown error")
                context = "".join(tail).rstrip()
                raise ImageBuildError(
                    f"{what} failed: {message.strip()}" + (f"\n{context}" if context else "")
                )
            if "stream" in chunk:
                line = chunk["stream"]
                tail.append(line)
                if line.strip():
                    self.log.info("%s", line.rstrip())
            elif "status" in chunk and "progressDetail" not in chunk:
                self.log.info("%s%s", chunk["status"], f" {chunk['id']}" if chunk.get("id") else "")
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get(aux_key):
                aux_value = aux[aux_key]
        return aux_value

    # --- the whole flow -----------------------------------------------------------------------
    def ensure_image(
        self,
        context: BuildContext,
        repository: str,
        base_image: str,
        *,
        build_args: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        force_build: bool = False,
    ) -> ImageResult:
        """Make sure the image of ``context`` is in the registry; return it pinned by digest.

        :param context: the build inputs (:class:`~slurmflow.images.BuildContext`).
        :param repository: path in the registry, e.g. ``slurmflow/training``.
        :param base_image: passed as ``BASE_IMAGE``; its id is part of the tag.
        :param build_args: other build args (part of the tag too).
        :param labels: extra image labels (not part of the tag).
        :param force_build: build and push even when the registry has the tag.
        """
        started = time.monotonic()
        self.registry.check()
        plan = self.plan(context, repository, base_image, build_args)
        tag = plan.ref.tag or ""
        digest = None if force_build else self.registry.manifest_digest(plan.ref.repository, tag)
        built = pushed = False
        if digest:
            self.log.info("Registry already has %s (%s): nothing to build", plan.ref, digest)
        else:
            # One build per tag at a time on this machine: a parallel task waits, then finds the tag.
            with _tag_lock(tag):
                digest = None if force_build else self.registry.manifest_digest(plan.ref.repository, tag)
                if not digest:
                    if force_build or not self._has_local(plan):
                        self.build(context, plan, build_args=build_args, labels=labels)
                        built = True
                    else:
                        self.log.info("Daemon already has %s: pushing without rebuilding", plan.ref)
                    digest = self.push(plan.ref)
                    pushed = True
        result = ImageResult(
            image=plan.ref.with_digest(digest).pinned(),
            digest=digest,
            tag=tag,
            content_hash=plan.content_hash,
            built=built,
            pushed=pushed,
            base_image_id=plan.base_image_id,
            seconds=round(time.monotonic() - started, 3),
        )
        self.log.info("Image %s (built=%s, pushed=%s, %.1fs)", result.image, built, pushed, result.seconds)
        return result

    def _has_local(self, plan: ImagePlan) -> bool:
        from docker.errors import ImageNotFound

        try:
            labels = self.client.inspect_image(str(plan.ref))["Config"].get("Labels") or {}
        except ImageNotFound:
            return False
        return labels.get(LABEL_CONTENT_HASH) == plan.content_hash


class _tag_lock:
    """An exclusive ``flock`` per tag in the temp folder (released by the kernel if we die)."""

    def __init__(self, tag: str) -> None:
        self.path = Path(tempfile.gettempdir()) / f"slurmflow-image-{tag}.lock"

    def __enter__(self) -> _tag_lock:
        self.fh = open(self.path, "a")  # noqa: SIM115 - held for the with-block
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
