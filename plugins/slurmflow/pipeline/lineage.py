"""Continue a previous experiment: from an ``init_from`` reference to the parent's checkpoint.

``init_from`` names a run the way MLflow users do: ``models:/<name>/<version>``,
``models:/<name>@<alias>`` or a run id. :func:`resolve` turns it into a :class:`Parent` with
MLflow's client: a model version gives its ``run_id``; the run's tags, set by the register step,
give where its job ran (``slurm.job_dir``, ``slurm.cluster``, ``hpctrain.task``) and its
``result.json`` artifact how many epochs it trained.

Where the checkpoint comes from (:func:`checkpoint_source`): on the parent's own cluster, its
job directory's ``checkpoints/last.ckpt`` on the shared filesystem, which the new job copies into
its own directory before training (the parent's stays intact); when that file is gone or the
parent ran on another cluster, the run's artifact :data:`CHECKPOINT_ARTIFACT`, if it has one,
which the job_spec step stages on the cluster; otherwise a clear error at preflight.

Lineage on the new run: the tags :data:`PARENT_TAG` (the parent's run id), :data:`INIT_FROM_TAG`
(the reference as given) and :data:`INIT_MODE_TAG`, on the MLflow run and its model version, and
``parent`` in the catalog document. Not ``mlflow.parentRunId``: MLflow reserves it for nested runs
(the UI would fold the continued run under its parent, possibly across experiments, as if it were
one of its trials); a continuation is a run of its own.

No Airflow imports: the client is passed in (tests use a file-store MLflow).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PARENT_TAG = "slurmflow.parent_run_id"
INIT_FROM_TAG = "slurmflow.init_from"
INIT_MODE_TAG = "slurmflow.init_mode"
#: the artifact a run may carry its last checkpoint as (the fallback when its job dir is out of reach)
CHECKPOINT_ARTIFACT = "checkpoints/last.ckpt"
#: the parent's checkpoint inside its job directory (hpctrain.job.JobDir.last_checkpoint)
JOB_CHECKPOINT = "checkpoints/last.ckpt"
#: where result.json sits among a run's artifacts: logged by register, and by the job itself
_RESULT_ARTIFACTS = ("result/result.json", "result.json")

_VERSION_RE = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)$")
_ALIAS_RE = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[A-Za-z0-9_-]+)$")
_RUN_RE = re.compile(r"^[0-9a-f]{32}$")


class LineageError(ValueError):
    """``init_from`` cannot be used: unknown model/run, no checkpoint, epochs already reached."""


def parse_reference(reference: str) -> dict[str, str]:
    """``{"kind": "version"|"alias"|"run", ...}`` of an ``init_from`` value.

    :raises LineageError: none of the three forms.
    """
    for kind, pattern in (("version", _VERSION_RE), ("alias", _ALIAS_RE), ("run", _RUN_RE)):
        match = pattern.match(reference or "")
        if match:
            return {"kind": kind, **(match.groupdict() if kind != "run" else {"run_id": reference})}
    raise LineageError(f"init_from={reference!r} is not models:/<name>/<version>, models:/<name>@<alias> "
                       "or an MLflow run id (32 hex digits)")


@dataclass(frozen=True)
class Parent:
    """The run a continued job starts from.

    :param reference: ``init_from`` as given.
    :param run_id: its MLflow run.
    :param model_name: the registered model, when given by one.
    :param model_version: the version that reference pointed at.
    :param job_dir: its job directory on the cluster (tag ``slurm.job_dir``).
    :param cluster: the cluster's connection id (tag ``slurm.cluster``).
    :param task: the task class it trained (``hpctrain.task``).
    :param epochs: the epochs it trained (its ``result.json``), when known.
    :param has_artifact: the run holds :data:`CHECKPOINT_ARTIFACT`.
    """

    reference: str
    run_id: str
    model_name: str | None = None
    model_version: str | None = None
    job_dir: str | None = None
    cluster: str | None = None
    task: str | None = None
    epochs: int | None = None
    has_artifact: bool = False

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint in its job directory (which may be gone)."""
        return f"{self.job_dir.rstrip('/')}/{JOB_CHECKPOINT}" if self.job_dir else None

    def tags(self, mode: str) -> dict[str, str]:
        """The lineage tags of the continued run and its model version."""
        return {PARENT_TAG: self.run_id, INIT_FROM_TAG: self.reference, INIT_MODE_TAG: mode}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _missing(exc: Exception) -> bool:
    code = str(getattr(exc, "error_code", ""))
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower()


def resolve(client: Any, reference: str) -> Parent:
    """Find the run behind ``reference`` and what is known of its training.

    :param client: an :class:`mlflow.MlflowClient` (or the hook's scoped client).
    :raises LineageError: an unknown model version, alias or run.
    """
    ref = parse_reference(reference)
    name = version = None
    if ref["kind"] in ("version", "alias"):
        name = ref["name"]
        try:
            mv = (client.get_model_version(name, ref["version"]) if ref["kind"] == "version"
                  else client.get_model_version_by_alias(name, ref["alias"]))
        except Exception as exc:
            if _missing(exc):
                raise LineageError(f"init_from={reference}: no such model version in MLflow ({exc})") from exc
            raise
        if not mv.run_id:
            raise LineageError(f"init_from={reference}: version {mv.version} of {name} has no run")
        run_id, version = mv.run_id, str(mv.version)
    else:
        run_id = ref["run_id"]
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        if _missing(exc):
            raise LineageError(f"init_from={reference}: no MLflow run {run_id} ({exc})") from exc
        raise
    tags = run.data.tags
    manifest = _result(client, run_id)
    training = manifest.get("training") or {}
    epochs = training.get("epochs_completed")
    listed = {f.path for f in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])}
    return Parent(
        reference=reference, run_id=run_id, model_name=name, model_version=version,
        job_dir=tags.get("slurm.job_dir") or manifest.get("job_dir"), cluster=tags.get("slurm.cluster"),
        task=tags.get("hpctrain.task") or manifest.get("task"),
        epochs=int(epochs) if isinstance(epochs, int) else None,
        has_artifact=CHECKPOINT_ARTIFACT in listed,
    )


def _result(client: Any, run_id: str) -> dict[str, Any]:
    """The run's ``result.json`` artifact, or ``{}``."""
    with tempfile.TemporaryDirectory(prefix="slurmflow-parent-") as tmp:
        for path in _RESULT_ARTIFACTS:
            try:
                local = client.download_artifacts(run_id, path, tmp)
            except Exception:
                continue
            try:
                return json.loads(Path(local).read_text())
            except (OSError, ValueError):
                continue
    return {}


def check_continuation(parent: Parent, params: Mapping[str, Any], task: str | None = None) -> None:
    """What can be known before anything runs.

    :param params: the run's Params (``max_epochs``, ``init_mode``).
    :param task: the task class the new run's config trains (``model.class_path``), when known.
    :raises LineageError: ``max_epochs`` already reached (resume), or another task's weights.
    """
    mode = params.get("init_mode") or "resume"
    max_epochs = int(params["max_epochs"])
    if mode == "resume" and parent.epochs is not None and max_epochs <= parent.epochs:
        raise LineageError(
            f"max_epochs={max_epochs} is already reached: {parent.reference} (run {parent.run_id}) trained "
            f"{parent.epochs} epoch(s), and max_epochs counts all epochs, the parent's included (as Lightning "
            f"does). Set max_epochs above {parent.epochs} to train {parent.epochs + 1} or more, or init_mode="
            "weights to start a fresh schedule from its weights")
    if task and parent.task and task != parent.task:
        raise LineageError(f"{parent.reference} (run {parent.run_id}) trained {parent.task}, but this run's config "
                           f"trains {task}: pick the task / config it was trained with")


def checkpoint_source(parent: Parent, cluster: str, exists: Callable[[str], bool]) -> tuple[str, str]:
    """Where the new job gets the parent's checkpoint from.

    :param cluster: the connection id of the cluster the new job runs on.
    :param exists: whether a file exists (non-empty) on that cluster.
    :return: ``("cluster", path)``: the parent's own file on the shared filesystem; or
        ``("artifact", CHECKPOINT_ARTIFACT)``: download from MLflow and stage it.
    :raises LineageError: neither is there.
    """
    why = []
    if not parent.job_dir:
        why.append("the run has no slurm.job_dir tag (not trained by slurmflow)")
    elif parent.cluster and parent.cluster != cluster:
        why.append(f"it ran on cluster {parent.cluster!r}, this run uses {cluster!r}")
    elif exists(str(parent.checkpoint)):
        return "cluster", str(parent.checkpoint)
    else:
        why.append(f"{parent.checkpoint} is gone")
    if parent.has_artifact:
        return "artifact", CHECKPOINT_ARTIFACT
    why.append(f"the run has no {CHECKPOINT_ARTIFACT} artifact")
    raise LineageError(f"no checkpoint to continue {parent.reference} (run {parent.run_id}) from: " + "; ".join(why))


def staged_checkpoint_path(job_root: str, run_id: str) -> str:
    """Where job_spec stages a parent's checkpoint artifact on the cluster (one copy per parent run)."""
    if not _RUN_RE.match(run_id):
        raise LineageError(f"unexpected run id {run_id!r}")
    return f"{job_root.rstrip('/')}/init/{run_id}/last.ckpt"
