"""BuildImageOperator: have the training image in the registry, by content, and hand on its digest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from slurmflow.constants import DEFAULT_BASE_IMAGE, DEFAULT_EXCLUDES

if TYPE_CHECKING:
    from airflow.sdk import Context

    from slurmflow.hooks.image import ImageBuildHook
    from slurmflow.images import BuildContext

#: The project folder (Astro layout: plugins/, docker/, training/ side by side).
PROJECT_ROOT = Path(__file__).resolve().parents[3]

#: XCom keys pushed besides the return value (which is the pinned ``image@digest``).
XCOM_DIGEST, XCOM_TAG, XCOM_BUILT, XCOM_CODE = "digest", "tag", "built", "code_version"
#: Image label with the git revision of a build (a label: not part of the content tag).
LABEL_GIT_SHA = "org.opencontainers.image.revision"


class BuildImageOperator(BaseOperator):
    """Build (only if needed) and push the training image; return ``registry/repo@sha256:...``.

    The tag is the content hash of the Dockerfile, the training code, the locked dependencies
    and the base image's id. If the registry already has that tag, nothing is built: the task
    answers with the digest in well under two seconds. Otherwise the image is built from a
    context holding exactly the hashed files plus the wheelhouse (``scripts/wheelhouse.sh``),
    pushed, and the digest read back from the registry. Downstream jobs must use the returned
    ``image@digest``, never the tag.

    :param repository: path in the registry, e.g. ``slurmflow/training`` (templated).
    :param base_image: ``BASE_IMAGE`` build arg, e.g. ``{{ var.value.slurmflow_base_image }}``;
        default the Dockerfile's own default (templated).
    :param context_dir: build context folder (templated); default: the project folder.
    :param dockerfile: Dockerfile, relative to ``context_dir`` (templated).
    :param lock_file: locked dependencies, relative to ``context_dir`` (templated).
    :param code_paths: code folders copied into the image, relative to ``context_dir``.
    :param wheelhouse: wheel folder for ``lock_file``, relative to ``context_dir``.
    :param excludes: glob patterns left out of ``code_paths``.
    :param build_args: further build args; they are part of the tag (templated).
    :param labels: extra image labels, e.g. the git revision; not part of the tag (templated).
    :param registry_conn_id: connection (type docker) of the registry; also logs the daemon in.
    :param docker_url: Docker daemon URL (default ``$DOCKER_HOST`` or the local socket).
    :param force_build: build and push even if the registry has the tag.

    XCom: return value = ``image`` (``registry/repo@sha256:...``); keys ``digest``, ``tag``,
    ``built`` (False when the registry already had it) and ``code_version`` (``git_sha``,
    ``git_dirty``, ``version`` = ``<sha>[-dirty]``, ``content_tag``): the revision of the project
    checkout this task ran from, which the register step puts on the MLflow run, the model
    version and the catalog.
    """

    template_fields: Sequence[str] = (
        "repository",
        "base_image",
        "context_dir",
        "dockerfile",
        "lock_file",
        "build_args",
        "labels",
    )
    template_fields_renderers = {"build_args": "json", "labels": "json"}
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        repository: str = "slurmflow/training",
        base_image: str = DEFAULT_BASE_IMAGE,
        context_dir: str | None = None,
        dockerfile: str = "docker/training.Dockerfile",
        lock_file: str = "docker/requirements.lock",
        code_paths: Sequence[str] = ("training",),
        wheelhouse: str = "wheelhouse",
        excludes: Sequence[str] = DEFAULT_EXCLUDES,
        build_args: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        registry_conn_id: str = "registry_default",
        docker_url: str | None = None,
        force_build: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.repository = repository
        self.base_image = base_image
        self.context_dir = context_dir or str(PROJECT_ROOT)
        self.dockerfile = dockerfile
        self.lock_file = lock_file
        self.code_paths = tuple(code_paths)
        self.wheelhouse = wheelhouse
        self.excludes = tuple(excludes)
        self.build_args = dict(build_args or {})
        self.labels = dict(labels or {})
        self.registry_conn_id = registry_conn_id
        self.docker_url = docker_url
        self.force_build = force_build

    @cached_property
    def hook(self) -> ImageBuildHook:
        from slurmflow.hooks.image import ImageBuildHook

        return ImageBuildHook(self.registry_conn_id, self.docker_url)

    def build_context(self) -> BuildContext:
        from slurmflow.images import BuildContext  # deferred: images is not needed to parse a DAG

        return BuildContext(
            root=Path(self.context_dir),
            dockerfile=self.dockerfile,
            lock_file=self.lock_file,
            code_paths=self.code_paths,
            wheelhouse=self.wheelhouse,
            excludes=self.excludes,
        )

    def execute(self, context: Context) -> str:
        from slurmflow.images import code_version, source_revision  # deferred: run time only

        revision = source_revision(self.context_dir)
        labels = {k: str(v) for k, v in self.labels.items()}
        if revision["git_sha"]:
            labels.setdefault(LABEL_GIT_SHA, code_version(revision))
        result = self.hook.ensure_image(
            self.build_context(),
            self.repository,
            self.base_image,
            build_args={k: str(v) for k, v in self.build_args.items()},
            labels=labels,
            force_build=self.force_build,
        )
        ti = context["ti"]
        ti.xcom_push(key=XCOM_DIGEST, value=result.digest)
        ti.xcom_push(key=XCOM_TAG, value=result.tag)
        ti.xcom_push(key=XCOM_BUILT, value=result.built)
        ti.xcom_push(key=XCOM_CODE, value={**revision, "version": code_version(revision), "content_tag": result.tag})
        return result.image
