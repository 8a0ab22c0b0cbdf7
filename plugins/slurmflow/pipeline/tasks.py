"""The steps of the training DAGs, so that DAG files stay short and declarative.

Each step reads site settings (Airflow Variables, connections) at run time, never at parse
time, and talks to the outside world only through the hooks.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseHook, Variable, get_current_context, task
from airflow.sdk.bases.decorator import task_decorator_factory

# DAG files import this module at parse time: only what defines the steps is imported here. What
# the steps use when they run (hooks, identity, jobs, sbatch, results...) is imported inside them.
from slurmflow.constants import XCOM_JOB_KEY
from slurmflow.links import MlflowModelLink, MlflowRunLink
from slurmflow.operators.slurm import SlurmSubmitJobOperator
from slurmflow.pipeline.preparation import (
    check_experiment,
    find_parent,
    lineage_tags,
    model_name_of,
    parent_checkpoint,
    parent_of,
)
from slurmflow.retries import SERVICE_RETRIES
from slurmflow.secrets import SecretRefs, gather

if TYPE_CHECKING:
    from slurmflow.identity import JobIdentity
    from slurmflow.pipeline.jobs import Site

log = logging.getLogger(__name__)

#: where the cluster user keeps the registry credentials jobs pull with (mode 700 / 600)
AUTH_DIR = ".slurmflow/registry-auth"


def identity_of(job: dict[str, Any] | None, context: dict[str, Any], train_task: str = "train") -> JobIdentity:
    """The identity of the training ``job`` (the train task's result or ``slurm_job`` record).

    Only the catalog step can meet a run without a job (the train task never submitted): it
    then records under the train task's key in its *own* generation, since a clear of train
    clears its downstream steps with it. Steps that need a job use ``JobIdentity.from_dict``.
    """
    from slurmflow.identity import JobIdentity, JobKey, generation_of

    if job and job.get("identity"):
        return JobIdentity.from_dict(job["identity"])
    ti = context["ti"]
    key = JobKey(context["dag"].dag_id, context["run_id"], train_task)
    return JobIdentity(key, generation_of(getattr(ti, "max_tries", 0), getattr(ti.task, "retries", 0)))


def code_tags(code: dict[str, Any] | None) -> dict[str, str]:
    """The build_image task's ``code_version`` XCom as tags (run, model version, catalog)."""
    code = code or {}
    tags = {"code_version": code.get("version") or "unknown", "code.git_sha": code.get("git_sha"),
            "code.git_dirty": code.get("git_dirty"), "image.content_tag": code.get("content_tag")}
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in tags.items() if v is not None}


class _MlflowLinkedTask(_PythonDecoratedOperator):
    """A TaskFlow task with the ``MLflow run`` / ``MLflow model`` buttons on its task page."""

    operator_extra_links = (MlflowRunLink(), MlflowModelLink())


def mlflow_task(**kwargs: Any):
    """``@task``, plus the MLflow extra links (URLs pushed as ``mlflow_run_url``/``mlflow_model_url``)."""
    return task_decorator_factory(decorated_operator_class=_MlflowLinkedTask, **kwargs)


#: The connection of the cluster a run uses when its ``cluster`` Param is empty.
DEFAULT_CLUSTER = "slurm_default"
#: Template of the train task's connection: the run's ``cluster`` Param (the trigger polls it too).
CLUSTER_TEMPLATE = "{{ params.cluster or '" + DEFAULT_CLUSTER + "' }}"


def cluster_of(params: Mapping[str, Any]) -> str:
    """The SSH connection id of the cluster this run trains on."""
    return params.get("cluster") or DEFAULT_CLUSTER


def cluster_variables(cluster: str) -> dict[str, Any]:
    """The cluster's own settings: Variable ``slurmflow_cluster_<conn id>`` (a JSON object)."""
    return json.loads(Variable.get(f"slurmflow_cluster_{cluster}", default="{}"))


def _site_value(cluster_vars: Mapping[str, Any], name: str, default: Any) -> Any:
    """A site setting: the cluster's own (Variable ``slurmflow_cluster_<conn id>``, a JSON
    object), else the global Variable ``slurmflow_<name>``, else ``default``."""
    if name in cluster_vars:
        return cluster_vars[name]
    return Variable.get(f"slurmflow_{name}", default=default)


def site_settings(home: str | None = None, cluster: str = DEFAULT_CLUSTER) -> Site:
    """The cluster's settings from Airflow Variables (read at run time)."""
    from slurmflow.pipeline.jobs import Site

    mlflow = BaseHook.get_connection("mlflow_default")
    own = cluster_variables(cluster)

    def value(name: str, default: Any) -> Any:
        return _site_value(own, name, default)

    def as_json(name: str, default: str) -> Any:  # global Variables hold JSON text, the cluster's JSON itself
        raw = value(name, default)
        return json.loads(raw) if isinstance(raw, str) else raw

    return Site(
        partition=value("partition", "debug"),
        account=value("account", ""),
        runtime=value("container_runtime", "docker"),
        auth_dir=f"{home}/{AUTH_DIR}" if home else None,
        tracking_uri=value("job_tracking_uri", f"{mlflow.schema or 'http'}://{mlflow.host}:{mlflow.port}"),
        run_args=as_json("runtime_args", "[]"),
        insecure_registry=str(value("insecure_registry", "false")).lower() == "true",
        # plain settings every job's container gets, e.g. {"NCCL_SOCKET_IFNAME": "hsn"}; never secrets
        extra_env=as_json("job_env", "{}"),
    )


class TrainingJobOperator(SlurmSubmitJobOperator):
    """Submit a training job with the credentials it needs, read from connections at run time.

    The MLflow login (live metrics), the Mongo URI (surrogate data) and the registry login (the
    pull) go through :mod:`slurmflow.secrets`: the job's mode-600 secrets file and auth_dir,
    masked everywhere, never in the DAG, XCom, the sbatch script or argv.

    :param mlflow_conn_id: MLflow connection (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``).
    :param mongo_conn_id: MongoDB connection as compute nodes reach it (``MONGO_URI``).
    :param registry_conn_id: the registry whose login jobs pull with (masked: a job can read it).
    """

    def __init__(self, *, sbatch_options: Any = None, mlflow_conn_id: str = "mlflow_default",
                 mongo_conn_id: str = "mongo_default", registry_conn_id: str = "registry_default",
                 **kwargs: Any) -> None:
        kwargs.setdefault("secret_refs", SecretRefs(mlflow_conn_id, mongo_conn_id, registry_conn_id))
        super().__init__(**kwargs)
        # May be an XComArg (the job_spec task's output): resolved when templates are rendered.
        self.sbatch_options = sbatch_options or {}


def _slurm_hook(params: Mapping[str, Any] | None = None):
    """The hook of the run's cluster (its ``cluster`` Param; the current task's when not given)."""
    from slurmflow.hooks.slurm import SlurmHook

    return SlurmHook(cluster_of(get_current_context()["params"] if params is None else params))


@task(task_id="reap", trigger_rule="all_done", retries=2)
def reap(train_task: str = "train") -> str:
    """Cancel the train task's Slurm job if it is still queued or running once that task is done.

    The second line of "cancel means cancel": the trigger scancels when its task is marked
    failed/success or cleared, but only once a triggerer runs it; a task marked failed right after
    deferring, before any triggerer picked the trigger up, would otherwise leave an orphan job.
    """
    pulled = get_current_context()["ti"].xcom_pull(task_ids=train_task, key=XCOM_JOB_KEY)
    # a mapped train task (a sweep's array jobs) gives one record per map index, None where none ran
    records = [pulled] if isinstance(pulled, dict) else [r for r in pulled or () if r]
    if not records:
        return "no job was submitted"
    hook = _slurm_hook()
    job_ids = [str(r["job_id"]) for r in records]
    snaps = hook.get_states(job_ids)
    live = [j for j in job_ids if snaps.get(j) is not None and not snaps[j].state.is_terminal]
    if not live:
        return "; ".join(f"job {j}: {snaps[j].state.state.value if snaps.get(j) else 'unknown'}" for j in job_ids) + \
            ", nothing to cancel"
    log.warning("Slurm job(s) %s still queued or running but the task is over: cancelling", ", ".join(live))
    hook.cancel(live)
    return f"job(s) {', '.join(live)}: cancelled"


@task(task_id="preflight")
def preflight() -> str:
    """``sbatch --test-only`` with the run's resources: a bad partition/account/QOS fails here,
    before an image is built or anything is queued; so do Params that contradict each other
    (:func:`~slurmflow.pipeline.jobs.check_training_params`)."""
    from slurmflow.pipeline.jobs import check_training_params, sbatch_options

    params = get_current_context()["params"]
    try:
        check_training_params(params)
    except ValueError as exc:  # a combination of Params: bad input, no retry
        raise AirflowFailException(f"invalid Params: {exc}") from exc
    task_class = check_experiment(params)
    parent = find_parent(params, task_class) if params.get("init_from") else None
    hook = cluster_hook(params)
    if parent is not None:
        kind, source = parent_checkpoint(parent, hook, cluster_of(params))
        log.info("init_from %s: run %s, %s checkpoint %s", parent.reference, parent.run_id, kind, source)
    return slurm_would_accept(hook, lambda site: sbatch_options(params, site), cluster_of(params))


def cluster_hook(params: Mapping[str, Any]):
    """The run's cluster hook, once its connection is known to exist.

    :raises AirflowFailException: no such cluster (bad input, no retry).
    """
    hook = _slurm_hook(params)
    try:
        hook.get_connection(hook.slurm_conn_id)
    except Exception as exc:  # AirflowNotFoundException, whichever module raises it
        raise AirflowFailException(f"unknown cluster {cluster_of(params)!r}: a cluster is an SSH connection "
                                   "of that id (README, Several clusters)") from exc
    return hook


def slurm_would_accept(hook: Any, options: Any, cluster: str, explain: str = "") -> str:
    """Preflight's core: the controller's version is one we support, and ``sbatch --test-only``
    accepts a job of these resources (nothing is queued).

    :param options: ``site -> sbatch options`` of the run (the site's defaults filled in).
    :param explain: what the resources add up to, for Slurm's "no" (e.g. online_training's tasks).
    :raises AirflowFailException: bad resources or an unsupported Slurm (a retry gets the same answer).
    """
    from slurmflow.errors import SlurmSubmitError
    from slurmflow.sbatch import build_script, render_script
    from slurmflow.versions import UnsupportedSlurmVersion

    job_dir = f"{hook.job_root}/preflight/{uuid.uuid4().hex}"
    try:
        script = build_script(command="true", job_name="slurmflow-preflight", job_dir=job_dir,
                              options=options(site_settings(cluster=cluster)))
    except ValueError as exc:  # a combination of Params, or an sbatch_extra value: bad input, no retry
        raise AirflowFailException(f"invalid Slurm resources: {exc}") from exc
    try:
        hook.features  # noqa: B018 (the probe: a Slurm older than we support fails here, before any job)
    except UnsupportedSlurmVersion as exc:
        raise AirflowFailException(str(exc)) from exc
    hook.stage(script, render_script(script), None)
    try:
        return hook.test_only(script.script_path)
    except SlurmSubmitError as exc:  # Slurm's "no" to these resources: a retry gets the same answer
        raise AirflowFailException(f"Slurm would reject this job{f' ({explain})' if explain else ''}: {exc}") from exc
    finally:
        hook.remove_tree(job_dir)


def stage_registry_auth(hook: Any) -> str:
    """Give the cluster user the registry credentials jobs pull with (mode-700 dir, mode-600 files)."""
    secrets = gather(SecretRefs(registry_conn_id="registry_default"))
    secrets.mask()
    auth_dir = f"{hook.home}/{AUTH_DIR}"
    hook.make_dirs([auth_dir])
    hook.run(["chmod", "700", auth_dir])
    for name, content in secrets.registry_files().items():
        hook.upload(f"{auth_dir}/{name}", content, mode=0o600)
    return auth_dir


@task(task_id="job_spec")
def job_spec(image: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's command and resources for this run's Params and pinned image; the experiment
    config travels in the command, and a continued run's parent checkpoint is located (and, from
    an MLflow artifact, staged on the cluster). ``parent`` in the result records the lineage.

    :param overrides: Param values the DAG fixes (templated, e.g. the nightly data window).
    """
    from slurmflow.pipeline.experiments import read_config
    from slurmflow.pipeline.jobs import config_name, training_job

    params = {**get_current_context()["params"], **(overrides or {})}
    hook = _slurm_hook(params)
    stage_registry_auth(hook)
    try:
        text = read_config(config_name(params))
    except ValueError as exc:
        raise AirflowFailException(f"invalid config: {exc}") from exc
    parent, source, kind = None, None, None
    if params.get("init_from"):
        parent = find_parent(params)
        kind, source = parent_checkpoint(parent, hook, cluster_of(params), stage=True)
    spec = training_job(params, image, site_settings(hook.home, cluster_of(params)), text, source)
    if parent is not None:
        spec["parent"] = {**parent.as_dict(), "mode": params.get("init_mode") or "resume", "source": kind,
                          "checkpoint": source}
    return spec


@task(task_id="plan_trials")
def plan_trials() -> list[dict[str, Any]]:
    """The sweep's trials from the search space in the Params (grid, or seeded random)."""
    from slurmflow.pipeline.sweep import plan_trials as plan

    p = get_current_context()["params"]
    try:
        return plan(p["search_space"], p["search_strategy"], int(p["n_trials"]), int(p["search_seed"]))
    except ValueError as exc:
        raise AirflowFailException(f"invalid search space: {exc}") from exc


@task(task_id="job_spec")
def sweep_job_spec(image: str, trials: list[dict[str, Any]], overrides: dict[str, Any] | None = None) -> list[dict]:
    """The sweep's array jobs ("pieces"): as few as the cluster's ``MaxArraySize`` allows (or the
    Variable ``slurmflow_max_array_size``, when smaller), each throttled to ``max_parallel``. The
    train task maps over them, one piece at a time, so the throttle holds across all of them."""
    from slurmflow.pipeline.experiments import read_config
    from slurmflow.pipeline.jobs import config_name, container_options, sbatch_options
    from slurmflow.pipeline.sweep import piece_command, plan_pieces

    params = {**get_current_context()["params"], **(overrides or {})}
    hook = _slurm_hook(params)
    stage_registry_auth(hook)
    site = site_settings(hook.home, cluster_of(params))
    runtime = params.get("container_runtime") or site.runtime
    cap = _site_value(cluster_variables(cluster_of(params)), "max_array_size", "")
    max_array = min(hook.max_array_size(), int(cap) if cap else 1 << 31)
    try:
        config_text = read_config(config_name(params))
    except ValueError as exc:
        raise AirflowFailException(f"invalid config: {exc}") from exc
    pieces = plan_pieces(len(trials), max_array)
    if len(pieces) > 1:
        log.info("%d trials in %d array jobs of at most %d (MaxArraySize), run one after another",
                 len(trials), len(pieces), max_array)
    return [{
        "command": piece_command(params, trials, piece, image, runtime, config_text=config_text,
                                 **container_options(params, site)),
        "sbatch_options": sbatch_options(params, site, array=piece.array(int(params["max_parallel"]))),
    } for piece in pieces]


@mlflow_task(task_id="register", **SERVICE_RETRIES)
def register(job: dict[str, Any], image: str, default_model: str | None = None) -> dict[str, Any]:
    """Copy the results off the cluster, then log + register them in MLflow (idempotent).

    :param default_model: the model's name when the ``model_name`` Param is empty (default
        ``slurmflow-<config or task>``).
    """
    from slurmflow.identity import JobIdentity
    from slurmflow.paths import SCRIPT_FILE_NAME
    from slurmflow.pipeline.results import collect
    from slurmflow.pipeline.results import register as register_run

    context = get_current_context()
    params = context["params"]
    hook = _slurm_hook()
    code = code_tags(context["ti"].xcom_pull(task_ids="build_image", key="code_version"))
    parent = parent_of(context)
    with tempfile.TemporaryDirectory(prefix="slurmflow-results-") as tmp:
        local = Path(tmp)
        manifest = collect(hook, job["job_dir"], local)
        script = (local / SCRIPT_FILE_NAME).read_text() if (local / SCRIPT_FILE_NAME).is_file() else ""
        result = register_run(
            manifest, local, run_key=JobIdentity.from_dict(job["identity"]).run_key, job=job, image=image, sbatch_script=script,
            slurm=hook,
            model_name=params.get("model_name") or default_model or model_name_of(params),
            gpus_per_node=int(params.get("gpus_per_node") or 0),
            extra_tags={"airflow.dag_id": context["dag"].dag_id, "airflow.run_id": context["run_id"], **code,
                        **lineage_tags(parent)},
        )
    context["ti"].xcom_push(key=MlflowRunLink.url_key, value=result["run_url"])
    context["ti"].xcom_push(key=MlflowModelLink.url_key, value=result["model_url"])
    return {**result, "code": code, "data": manifest.get("data"), "slurm": manifest.get("slurm"),
            "data_spec": (manifest.get("hyperparameters") or {}).get("data"),
            "monitor": manifest.get("monitor"), "parent": parent}


@mlflow_task(task_id="register", **SERVICE_RETRIES)
def register_sweep(pieces: list[dict[str, Any]], image: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Log every trial as an MLflow run (nested under the sweep's summary run), register the best
    completed trial's model and log the metric-vs-hyperparameter plot on the summary run.
    Idempotent like :func:`register`; see :mod:`slurmflow.pipeline.sweep_results`.

    Failed trials are recorded (state, reason, log tail); with more than ``max_failed_fraction``
    of them no model is registered and the ``catalog_sweep`` step fails the run once it has
    recorded the sweep.
    """
    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.pipeline import sweep_results as sr
    from slurmflow.pipeline.results import ensure_model_logged
    from slurmflow.pipeline.sweep import best_trial, plot_trials

    context = get_current_context()
    params, dag_id, dag_run = context["params"], context["dag"].dag_id, context["run_id"]
    model_name = params.get("model_name") or f"slurmflow-{params['task']}"
    pieces = list(pieces)  # the mapped train task's results, in map-index order
    hook, mlflow = _slurm_hook(), MlflowHook()
    identity = sweep_identity(pieces)
    code = code_tags(context["ti"].xcom_pull(task_ids="build_image", key="code_version"))
    tags = {"airflow.dag_id": dag_id, "airflow.run_id": dag_run, **code}
    outcome = sr.layout(pieces, trials)
    with tempfile.TemporaryDirectory(prefix="slurmflow-sweep-") as tmp:
        local = Path(tmp)
        sr.collect(hook, outcome, local)
        sr.explain_failures(hook, outcome)
        done = [t for t in outcome if t.completed]
        experiment = ((done[0].manifest.get("mlflow") or {}).get("experiment") if done else None) or "slurmflow"
        scripts = local / "slurm"
        scripts.mkdir()
        for n, job in enumerate(pieces):
            (scripts / f"piece-{n}.sh").write_text(hook.run(["cat", job["script_path"]]).stdout)
        summary_key = f"{identity.run_key}/sweep"
        summary = mlflow.log_training(
            experiment=experiment, run_key=summary_key, run_name=f"sweep {dag_run}", params={}, metrics={},
            tags={sr.SWEEP_TAG: identity.run_key, "image": image, **tags}, artifacts={"slurm": scripts})
        sweep = sr.SweepContext(identity.run_key, summary, image, tags)

        def upload_offline(trial: sr.Trial) -> str:
            from hpctrain.offline import upload  # the compute node was offline: replay its store

            with mlflow.credentials():
                return upload(trial.local, mlflow.tracking_uri, experiment=experiment,
                              tags={"slurmflow.run_key": f"{identity.run_key}/trial-{trial.index}"})

        total = sr.usage(hook, outcome)
        sr.log_trials(mlflow, outcome, sweep, mlflow.experiment_id(experiment), upload_offline)
        results = [t.summary() for t in outcome]
        failed = [r for r in results if r["status"] == "failed"]
        fraction, limit = sr.failed_fraction(outcome), float(params.get("max_failed_fraction", 0.5))
        too_many = fraction > limit
        monitor = next((t.manifest.get("monitor") for t in done if t.manifest.get("monitor")), None) or {}
        metric = f"best/{monitor.get('metric') or 'val/loss'}"
        best, version = None, None
        if done and not too_many:
            best = best_trial([r for r in results if r["status"] == "completed"], metric, monitor.get("mode") or "min")
            winner = outcome[best["trial"]]
            ensure_model_logged(mlflow, best["run_id"], hook, winner.job_dir, winner.local)
            version = mlflow.register_model(model_name, best["run_id"], "model", {
                sr.SWEEP_TAG: identity.run_key, "slurmflow.trial": str(best["trial"]),
                "slurm.job_id": str(winner.job["job_id"]), "image": image, **code})
        summary_dir = local / "sweep"
        summary_dir.mkdir()
        (summary_dir / "trials.json").write_text(json.dumps(results, indent=2))
        sr.write_manifests(outcome, summary_dir / "manifests.jsonl")
        artifacts: dict[str, Any] = {"sweep": summary_dir}
        if done:
            artifacts["plots"] = plot_trials(results, metric, str(local / "metric_vs_hyperparameters.png"))
        metrics = {"sweep/trials": len(results), "sweep/failed_trials": len(failed)}
        if best:
            metrics[metric] = best["metrics"][metric]
        mlflow.log_training(
            experiment=experiment, run_key=summary_key, run_name=f"sweep {dag_run}",
            params={"search_space": json.dumps(params["search_space"], sort_keys=True),
                    "search_strategy": params["search_strategy"], "trials": len(trials),
                    "array_jobs": len(pieces)},
            metrics=metrics, artifacts=artifacts,
            tags={"slurm.job_ids": ",".join(str(j["job_id"]) for j in pieces), **(total.as_tags() if total else {}),
                  **({"best_trial": str(best["trial"]), "best_run_id": best["run_id"]} if best else {})},
        )
    if failed:
        log.warning("%d of %d trials failed (limit %.0f%%); first: trial %s %s: %s", len(failed), len(results),
                    100 * limit, failed[0]["trial"], failed[0]["state"], failed[0]["reason"])
    context["ti"].xcom_push(key=MlflowRunLink.url_key, value=mlflow.ui_url(f"experiments/-/runs/{summary}"))
    if version:
        context["ti"].xcom_push(key=MlflowModelLink.url_key,
                                value=mlflow.ui_url(f"models/{model_name}/versions/{version}"))
    return {"trials": results, "best": best, "metric": metric, "model_name": model_name, "model_version": version,
            "summary_run_id": summary, "sweep_key": identity.run_key, "code": code,
            "failed_trials": len(failed), "failed_fraction": fraction, "max_failed_fraction": limit,
            "too_many_failed": too_many, "usage": total.as_dict() if total else None}


def sweep_identity(pieces: list[dict[str, Any]]) -> JobIdentity:
    """The sweep's one identity: the train task with no map index, in the newest generation of its
    pieces (a clear of train clears them all)."""
    from slurmflow.identity import JobIdentity

    first = JobIdentity.from_dict(pieces[0]["identity"])
    generation = max(JobIdentity.from_dict(p["identity"]).generation for p in pieces)
    return JobIdentity(replace(first.key, map_index=-1), generation)


@task(task_id="catalog_sweep", **SERVICE_RETRIES)
def catalog_sweep(sweep: dict[str, Any]) -> dict[str, Any]:
    """One catalog document summarising the sweep and its trials (upserted by sweep key); then
    fail the run if more trials failed than ``max_failed_fraction`` allows."""
    from slurmflow.hooks.catalog import RunCatalogHook

    context = get_current_context()
    ti = context["ti"]
    failed = [t for t in sweep["trials"] if t.get("status") == "failed"]
    doc = RunCatalogHook().record_sweep(sweep["sweep_key"], {
        "dag_id": context["dag"].dag_id, "run_id": context["run_id"], "params": dict(context["params"]),
        "slurm": list(ti.xcom_pull(task_ids="train") or []), "image": ti.xcom_pull(task_ids="build_image"),
        "metric": sweep["metric"], "trials": sweep["trials"],
        "best_trial": sweep["best"]["trial"] if sweep["best"] else None,
        "failed_trials": [t["trial"] for t in failed], "code": sweep["code"], "usage": sweep.get("usage"),
        "mlflow": {"model_name": sweep["model_name"], "model_version": sweep["model_version"],
                   "summary_run_id": sweep["summary_run_id"]},
    })
    if sweep["too_many_failed"] or not sweep["best"]:
        raise AirflowFailException(
            f"{len(failed)} of {len(sweep['trials'])} trials failed (more than max_failed_fraction="
            f"{sweep['max_failed_fraction']}): no model registered; catalog document {doc['sweep_key']} "
            f"records every trial (first failure: trial {failed[0]['trial']} {failed[0]['state']}: "
            f"{failed[0]['reason']})" if failed else "no trial reported a metric")
    return {"sweep_key": doc["sweep_key"], "trials": len(doc["trials"]), "best_trial": doc["best_trial"],
            "failed_trials": len(failed)}


@task(task_id="evaluate_and_promote", **SERVICE_RETRIES)
def evaluate_and_promote(registration: dict[str, Any], alias: str, margin: float,
                         holdout_query: dict[str, Any]) -> dict[str, Any]:
    """Evaluate challenger and champion on the same held-out data; move ``alias`` only to a clear winner.

    Idempotent per run: when the challenger already holds the alias, nothing changes. The decision
    and its reason are tagged on the challenger's model version.
    """
    import copy

    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.pipeline.promotion import decide, evaluate_version
    from slurmflow.secrets import mongo_uri

    margin = float(margin)  # templated: arrives as a string
    mlflow = MlflowHook()
    name, version = registration["model_name"], registration["model_version"]
    monitor = registration.get("monitor") or {}
    metric, mode = monitor.get("metric") or "val/loss", monitor.get("mode") or "min"
    spec = copy.deepcopy(registration["data_spec"])
    spec["init_args"]["mongo"]["query"] = holdout_query
    # The held-out data is read here, from Airflow's view of Mongo: the URI goes into this
    # in-memory spec (never os.environ, which every child process would inherit), masked.
    spec["init_args"]["mongo"]["uri"] = mongo_uri("mongo_default")
    champion = mlflow.version_by_alias(name, alias)
    if champion is not None and champion.version == version:
        return {"promote": True, "reason": "already the champion (re-run)", "champion_version": version}
    challenger_value = evaluate_version(mlflow.client, name, version, spec)["metrics"][metric]
    champion_value = None
    if champion is not None:
        champion_value = evaluate_version(mlflow.client, name, champion.version, spec)["metrics"][metric]
    decision = decide(metric, mode, challenger_value, champion_value, margin)
    for key, value in (("promotion.decision", "promoted" if decision.promote else "rejected"),
                       ("promotion.reason", decision.reason),
                       ("promotion.holdout_metric", f"{metric}={challenger_value:.6g}")):
        mlflow.client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        mlflow.set_alias(name, alias, version)
    return {**decision.as_dict(), "challenger_version": version,
            "champion_version": version if decision.promote else champion.version}


@task(task_id="catalog", trigger_rule="all_done", **SERVICE_RETRIES)
def catalog(train_task: str = "train", register_task: str = "register", image_task: str = "build_image") -> dict:
    """Record the run in the MongoDB catalog whatever its outcome, so failed runs are findable too.

    Runs after everything else (``all_done``) and reads what the other steps left in XCom.
    """
    from slurmflow.hooks.catalog import RunCatalogHook
    from slurmflow.pipeline.results import catalog_record

    context = get_current_context()
    ti = context["ti"]
    job = ti.xcom_pull(task_ids=train_task) or ti.xcom_pull(task_ids=train_task, key=XCOM_JOB_KEY)
    registration = ti.xcom_pull(task_ids=register_task)
    image = ti.xcom_pull(task_ids=image_task)
    # One document per generation: a clear of train starts a new one, the old keeps its history.
    identity = identity_of(job, context, train_task)
    key = identity.run_key
    hook = RunCatalogHook()
    common = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "generation": identity.generation,
              "params": dict(context["params"])}
    promotion = ti.xcom_pull(task_ids="evaluate_and_promote")
    if promotion:
        common["promotion"] = promotion
    parent = parent_of(context)
    if parent:
        common["parent"] = parent
    if job:
        catalog_record(hook, key, "submitted", job=job, image=image, extra=common)
    if job and job.get("state") == "COMPLETED":
        catalog_record(hook, key, "completed", job=job)
    doc = catalog_record(hook, key, "registered" if registration else "failed", registration=registration,
                         extra=common)
    if not registration:
        # Recorded; now let the run fail too (this all_done task is the DAG's leaf).
        raise AirflowFailException(f"training did not produce a registered model; catalog document {key} "
                                   "records the failure")
    return {"run_key": doc["run_key"], "state": doc["state"], "history": [h["state"] for h in doc["history"]]}
