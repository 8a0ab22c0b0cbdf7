"""The steps of ``experiment_pipeline``: per stage a spec (key, cache entry, job) and a Slurm job
that is submitted only when the key is not cached; then the MLflow report and the catalog.

See :mod:`slurmflow.pipeline.stages` for keys, the cache and its lock. DAG files import this
module at parse time: what the steps use when they run is imported inside them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException
from airflow.sdk import Variable, get_current_context, task

from slurmflow.links import MlflowRunLink
from slurmflow.pipeline.tasks import (
    TrainingJobOperator,
    _site_value,
    _slurm_hook,
    cluster_of,
    cluster_variables,
    code_tags,
    mlflow_task,
    site_settings,
    stage_registry_auth,
)
from slurmflow.retries import SERVICE_RETRIES

log = logging.getLogger(__name__)

#: the Variable holding the stage cache: a path, or ``{"path", "group", "mode"}`` (JSON)
CACHE_VARIABLE = "slurmflow_stage_cache"


class StageJobOperator(TrainingJobOperator):
    """A pipeline stage's Slurm job, submitted only when its key is not in the stage cache.

    Before submitting, ``stage_spec["check"]`` (``test -f <entry>/stage.json && cat``) runs on the
    login node: a cached stage returns that entry (``cached: True``) and submits no job. Otherwise
    the job runs under the key's lock and publishes the entry (see :mod:`slurmflow.pipeline.stages`);
    exactly-once submission, deferred waiting and cancellation are the parent's.

    :param stage_spec: the ``<stage>_spec`` task's result (templated: an XComArg).
    """

    template_fields = (*TrainingJobOperator.template_fields, "stage_spec")

    def __init__(self, *, stage_spec: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage_spec = stage_spec

    def execute(self, context: Any) -> dict[str, Any] | None:
        spec = self.stage_spec
        found = self.hook.run(spec["check"])
        if found.exit_code == 0 and found.stdout.strip():
            record = json.loads(found.stdout)
            self.log.info("Stage %s: key %s is in the cache (%s, computed by %s): no Slurm job", spec["stage"],
                          spec["key"], spec["entry"], record.get("created_by"))
            return {"stage": spec["stage"], "key": spec["key"], "cached": True, "entry": spec["entry"],
                    "outputs_hash": record.get("outputs_hash"), "created_by": record.get("created_by")}
        self.log.info("Stage %s: key %s is not cached: submitting its job", spec["stage"], spec["key"])
        return super().execute(context)


def stage_cache(hook: Any, cluster: str):
    """The cluster's stage cache: its own ``stage_cache`` setting (Variable
    ``slurmflow_cluster_<id>``), else Variable ``slurmflow_stage_cache``, else ``~/slurmflow-stage-cache``."""
    from slurmflow.pipeline.stages import StageCache

    value = _site_value(cluster_variables(cluster), "stage_cache", None)
    if value is None:
        value = Variable.get(CACHE_VARIABLE, default=None)
    try:
        return StageCache.from_setting(value, hook.home)
    except ValueError as exc:
        raise AirflowFailException(f"invalid stage cache setting: {exc}") from exc


def code_version_of(ti: Any, image: str) -> str:
    """The code version a key hashes: the image's content tag (Dockerfile, training code, locked
    deps), else its digest."""
    code = ti.xcom_pull(task_ids="build_image", key="code_version") or {}
    return str(code.get("content_tag") or image.rpartition("@")[2] or image)


def read_entry(hook: Any, check: str, stage: str) -> dict[str, Any]:
    """An upstream entry's ``stage.json`` (its outputs hash is the downstream key's input)."""
    found = hook.run(check)
    if found.exit_code != 0 or not found.stdout.strip():
        raise AirflowException(f"stage {stage}: its cache entry is missing ({check}); clear {stage} to recompute it")
    return json.loads(found.stdout)


def stage_spec(stage: str):
    """The ``<stage>_spec`` task: the stage's key, cache entry, lock and job for this run."""

    @task(task_id=f"{stage}_spec")
    def spec(image: str) -> dict[str, Any]:
        from slurmflow.pipeline.experiments import read_config
        from slurmflow.pipeline.stage_jobs import TRAIN_CONFIG, stage_job, stage_params
        from slurmflow.pipeline.stages import INPUTS, cache_check_command, stage_key, stage_record

        context = get_current_context()
        params, ti = context["params"], context["ti"]
        hook = _slurm_hook(params)
        cache = stage_cache(hook, cluster_of(params))
        code = code_version_of(ti, image)
        inputs: dict[str, dict[str, str]] = {}
        for upstream in INPUTS[stage]:
            up = ti.xcom_pull(task_ids=f"{upstream}_spec")
            record = read_entry(hook, up["check"], upstream)
            inputs[upstream] = {"key": up["key"], "outputs_hash": record["outputs_hash"], "entry": up["entry"]}
        own = stage_params(stage, params)
        key = stage_key(stage, code, own, {k: v["outputs_hash"] for k, v in inputs.items()})
        record = stage_record(stage, key, code, own, inputs, {
            "dag_id": context["dag"].dag_id, "run_id": context["run_id"], "task_id": stage})
        stage_registry_auth(hook)
        try:
            job = stage_job(stage, params, image, site_settings(hook.home, cluster_of(params)), cache, key, record,
                            {k: v["entry"] for k, v in inputs.items()},
                            config_text=read_config(TRAIN_CONFIG) if stage == "train" else "")
        except ValueError as exc:
            raise AirflowFailException(f"invalid stage {stage}: {exc}") from exc
        log.info("Stage %s: key %s (code %s, params %s, inputs %s)", stage, key, code, own,
                 {k: v["outputs_hash"] for k, v in inputs.items()})
        return {"stage": stage, "key": key, "entry": cache.entry(stage, key), "lock": cache.lock(stage, key),
                "check": cache_check_command(cache, stage, key), "params": own, "inputs": inputs,
                "code_version": code, "cache": cache.as_dict(), **job}

    return spec


def _stages(ti: Any) -> dict[str, dict[str, Any]]:
    """Per stage: its spec and what its task did (``cached`` or the Slurm job's result)."""
    from slurmflow.pipeline.stages import STAGES

    out = {}
    for stage in STAGES:
        spec, result = ti.xcom_pull(task_ids=f"{stage}_spec") or {}, ti.xcom_pull(task_ids=stage) or {}
        out[stage] = {"key": spec.get("key"), "entry": spec.get("entry"), "params": spec.get("params"),
                      "inputs": {k: v.get("outputs_hash") for k, v in (spec.get("inputs") or {}).items()},
                      "cached": bool(result.get("cached")), "job_id": result.get("job_id"),
                      "state": "cached" if result.get("cached") else result.get("state")}
    return out


@mlflow_task(task_id="report", **SERVICE_RETRIES)
def report(image: str) -> dict[str, Any]:
    """One MLflow run per pipeline run: every stage's params (``prepare.rows``...) and key, the
    held-out metrics of ``evaluate`` and the registered champion's on the same held-out table."""
    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.pipeline.promotion import decide, evaluate_version
    from slurmflow.pipeline.stage_jobs import HOLDOUT_FILE, METRICS_FILE, holdout_spec
    from slurmflow.pipeline.stages import STAGE_FILE

    context = get_current_context()
    params, ti = context["params"], context["ti"]
    stages = _stages(ti)
    hook, mlflow = _slurm_hook(params), MlflowHook()
    with tempfile.TemporaryDirectory(prefix="slurmflow-pipeline-") as tmp:
        local = Path(tmp)
        records = local / "stages"
        for stage, info in stages.items():
            hook.download(f"{info['entry']}/{STAGE_FILE}", records / f"{stage}.json")
        if not hook.download(f"{stages['evaluate']['entry']}/{METRICS_FILE}", local / METRICS_FILE):
            raise AirflowException(f"evaluate's {METRICS_FILE} is missing from {stages['evaluate']['entry']}")
        result = json.loads((local / METRICS_FILE).read_text())
        monitor = result.get("monitor") or {}
        metric, mode = monitor.get("metric") or "val/loss", monitor.get("mode") or "min"
        challenger = float(result["metrics"][metric])
        name, alias = params.get("model_name") or "slurmflow-surrogate", params["alias"]
        champion, champion_value, note = mlflow.version_by_alias(name, alias), None, ""
        if champion is not None:
            hook.download(f"{stages['prepare']['entry']}/{HOLDOUT_FILE}", local / HOLDOUT_FILE)
            try:
                champion_value = float(evaluate_version(mlflow.client, name, champion.version,
                                                        holdout_spec(str(local / HOLDOUT_FILE)))["metrics"][metric])
            except Exception as exc:  # a champion of other inputs: reported, not fatal
                note = f"champion {name}@{alias} (version {champion.version}) not comparable: {exc}"
                log.warning("%s", note)
        decision = decide(metric, mode, challenger, champion_value, 0.0)
        run_params: dict[str, Any] = {}
        tags = {"airflow.dag_id": context["dag"].dag_id, "airflow.run_id": context["run_id"], "image": image,
                **code_tags(ti.xcom_pull(task_ids="build_image", key="code_version"))}
        for stage, info in stages.items():
            run_params.update({f"{stage}.{k}": v for k, v in (info["params"] or {}).items()})
            run_params[f"{stage}.key"] = info["key"]
            tags.update({f"stage.{stage}.key": info["key"], f"stage.{stage}.cached": str(info["cached"]).lower()})
            if info["job_id"]:
                tags[f"stage.{stage}.job_id"] = str(info["job_id"])
        tags.update({"champion.comparison": decision.reason if not note else note,
                     "champion.better": str(bool(champion_value is not None and not decision.promote)).lower()})
        metrics = {f"holdout/{metric}": challenger, **{f"holdout/{k}": float(v) for k, v in result["metrics"].items()}}
        if champion_value is not None:
            metrics[f"champion/{metric}"] = champion_value
        run_key = f"{context['dag'].dag_id}/{context['run_id']}/pipeline"
        run_id = mlflow.log_training(experiment=params["experiment"], run_key=run_key,
                                     run_name=f"pipeline {context['run_id']}", params=run_params, metrics=metrics,
                                     tags=tags, artifacts={"stages": records, "evaluate": local / METRICS_FILE})
    ti.xcom_push(key=MlflowRunLink.url_key, value=mlflow.ui_url(f"experiments/-/runs/{run_id}"))
    return {"run_id": run_id, "run_key": run_key, "metric": metric, "holdout": challenger,
            "champion": {"name": name, "alias": alias, "version": champion.version if champion else None,
                         "value": champion_value, "note": note},
            "better_than_champion": champion_value is None or decision.promote, "reason": decision.reason}


@task(task_id="catalog", trigger_rule="all_done", **SERVICE_RETRIES)
def catalog_pipeline() -> dict[str, Any]:
    """Record the pipeline run in the catalog whatever its outcome: stage keys, which stages were
    cached, the dataset (prepare's key), the report. ``RunCatalogHook.runs_using_dataset`` answers
    "which runs used this dataset"."""
    from slurmflow.hooks.catalog import RunCatalogHook

    context = get_current_context()
    ti = context["ti"]
    stages = _stages(ti)
    outcome = ti.xcom_pull(task_ids="report")
    run_key = f"{context['dag'].dag_id}/{context['run_id']}/pipeline"
    doc = RunCatalogHook().record_pipeline(run_key, {
        "dag_id": context["dag"].dag_id, "run_id": context["run_id"], "params": dict(context["params"]),
        "stages": stages, "dataset_key": stages["prepare"]["key"],
        "dataset_hash": (stages["train"]["inputs"] or {}).get("prepare"),
        "report": outcome, "state": "completed" if outcome else "failed",
        "code_version": (ti.xcom_pull(task_ids="prepare_spec") or {}).get("code_version"),
    })
    if not outcome:
        raise AirflowFailException(f"the pipeline did not complete; catalog document {run_key} records it")
    return {"run_key": doc["run_key"], "dataset_key": doc["dataset_key"],
            "cached": [s for s, i in stages.items() if i["cached"]]}
