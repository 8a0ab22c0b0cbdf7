"""What a run of the user's own experiment needs checked and prepared: its config and overrides
(parsed by hpctrain's own parser at preflight) and, when it continues a previous experiment, its
parent (resolved in MLflow, its checkpoint located or staged). The steps in
:mod:`slurmflow.pipeline.tasks` call these; the pure parts live in
:mod:`slurmflow.pipeline.experiments` and :mod:`slurmflow.pipeline.lineage`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException

if TYPE_CHECKING:
    from slurmflow.pipeline.lineage import Parent


def check_experiment(params: Mapping[str, Any]) -> str | None:
    """The run's config and overrides through hpctrain's own parser (when the user chose either,
    or continues a run): a bad key or type fails the task once, with the parser's message.

    :return: the task class the config trains (``model.class_path``), or None when not checked.
    """
    if not (params.get("config") or params.get("overrides") or params.get("init_from")):
        return None  # a reference config with the form's typed fields: nothing of the user's to parse
    from slurmflow.pipeline.experiments import config_path, parse_check
    from slurmflow.pipeline.jobs import config_name, training_argv

    name = config_name(params)
    try:
        argv = training_argv(params, config=str(config_path(name)))
        parsed = parse_check(argv[argv.index("fit") + 1:])  # the arguments of `hpctrain fit`
    except ValueError as exc:
        raise AirflowFailException(f"config {name!r} with overrides {list(params.get('overrides') or [])} is "
                                   f"refused by hpctrain's parser: {exc}") from exc
    model = parsed.get("model")
    return canonical_class(model.get("class_path")) if isinstance(model, dict) else None


def canonical_class(class_path: str | None) -> str | None:
    """``module.Class`` where the class is defined, as the training records it (``hpctrain.task``):
    a config may name it through a package that re-exports it (``hpctrain.tasks.SurrogateRegressor``)."""
    if not class_path or "." not in class_path:
        return class_path
    import importlib

    module, name = class_path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path  # the parser accepted it; leave the comparison to the names
    return f"{cls.__module__}.{cls.__qualname__}"


def find_parent(params: Mapping[str, Any], task_class: str | None = None) -> Parent:
    """The run ``init_from`` names (:func:`slurmflow.pipeline.lineage.resolve`), checked against
    this run's ``max_epochs`` and task: a mistake fails the task once, before anything runs."""
    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.pipeline.lineage import LineageError, check_continuation, resolve

    try:
        parent = resolve(MlflowHook().client, params["init_from"])
        check_continuation(parent, params, task_class)
    except LineageError as exc:
        raise AirflowFailException(f"cannot continue: {exc}") from exc
    return parent


def parent_checkpoint(parent: Parent, hook: Any, cluster: str, stage: bool = False) -> tuple[str, str]:
    """Where the job gets the parent's checkpoint (:func:`~slurmflow.pipeline.lineage.checkpoint_source`);
    with ``stage``, an MLflow artifact is copied onto the cluster (once per parent run).

    :return: ``(kind, path on the cluster)`` (the artifact's path when not staged).
    """
    from slurmflow.pipeline.lineage import (
        CHECKPOINT_ARTIFACT,
        LineageError,
        checkpoint_source,
        staged_checkpoint_path,
    )

    try:
        kind, source = checkpoint_source(parent, cluster, lambda path: hook.run(["test", "-s", path]).exit_code == 0)
    except LineageError as exc:
        raise AirflowFailException(f"cannot continue: {exc}") from exc
    if kind == "artifact" and stage:
        source = staged_checkpoint_path(hook.job_root, parent.run_id)
        if hook.run(["test", "-s", source]).exit_code != 0:
            from slurmflow.hooks.mlflow import MlflowHook

            with tempfile.TemporaryDirectory(prefix="slurmflow-parent-") as tmp:
                local = MlflowHook().client.download_artifacts(parent.run_id, CHECKPOINT_ARTIFACT, tmp)
                hook.make_dirs([source.rsplit("/", 1)[0]])
                hook.upload(f"{source}.part", Path(local).read_bytes())
                hook.check(["mv", "-f", f"{source}.part", source])
    return kind, source


def model_name_of(params: Mapping[str, Any]) -> str:
    """The registered model's name: the ``model_name`` Param, else ``slurmflow-<config or task>``."""
    return params.get("model_name") or f"slurmflow-{params.get('config') or params['task']}"


def parent_of(context: Mapping[str, Any], spec_task: str = "job_spec") -> dict[str, Any] | None:
    """The lineage job_spec recorded for a continued run (``init_from``), else None."""
    spec = context["ti"].xcom_pull(task_ids=spec_task)
    return spec.get("parent") if isinstance(spec, dict) else None


def lineage_tags(parent: Mapping[str, Any] | None) -> dict[str, str]:
    """MLflow tags of a continued run (:mod:`slurmflow.pipeline.lineage`): the parent's run id, the
    reference as given and the mode."""
    if not parent:
        return {}
    from slurmflow.pipeline.lineage import INIT_FROM_TAG, INIT_MODE_TAG, PARENT_TAG

    return {PARENT_TAG: parent["run_id"], INIT_FROM_TAG: parent["reference"], INIT_MODE_TAG: parent["mode"]}
