"""The steps of the training DAGs, so that DAG files stay short and declarative.

Each step reads site settings (Airflow Variables, connections) at run time, never at parse
time, and talks to the outside world only through the hooks.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import BaseHook, Variable, get_current_context, task
from slurmflow.operators.slurm import SlurmSubmitJobOperator
from slurmflow.pipeline.jobs import Site, sbatch_options, training_job

#: where the cluster user keeps the registry credentials jobs pull with (mode 700 / 600)
AUTH_DIR = ".slurmflow/registry-auth"


def run_key(context: dict[str, Any], task_id: str = "train", map_index: int = -1) -> str:
    """The deterministic key of a training (same as the Slurm layer's job key)."""
    return f"{context['dag'].dag_id}/{context['run_id']}/{task_id}/{map_index}"


def site_settings(home: str | None = None) -> Site:
    """The cluster's settings from Airflow Variables (read at run time)."""
    import json

    mlflow = BaseHook.get_connection("mlflow_default")
    return Site(
        partition=Variable.get("slurmflow_partition", default="debug"),
        account=Variable.get("slurmflow_account", default=""),
        runtime=Variable.get("slurmflow_container_runtime", default="docker"),
        auth_dir=f"{home}/{AUTH_DIR}" if home else None,
        tracking_uri=Variable.get("slurmflow_job_tracking_uri",
                                  default=f"{mlflow.schema or 'http'}://{mlflow.host}:{mlflow.port}"),
        mongo_uri=Variable.get("slurmflow_job_mongo_uri", default=""),
        run_args=json.loads(Variable.get("slurmflow_runtime_args", default="[]")),
        insecure_registry=Variable.get("slurmflow_insecure_registry", default="false").lower() == "true",
    )


class TrainingJobOperator(SlurmSubmitJobOperator):
    """Submit a training job; the MLflow credentials reach it through the job's secrets file.

    They come from the ``mlflow_default`` connection at run time, so they are never in the
    DAG, XCom, the sbatch script or argv (the Slurm layer masks them in logs and rendered fields).

    :param mlflow_conn_id: connection whose login/password the training uses for live metrics.
    """

    def __init__(self, *, sbatch_options: Any = None, mlflow_conn_id: str = "mlflow_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # May be an XComArg (the job_spec task's output): resolved when templates are rendered.
        self.sbatch_options = sbatch_options or {}
        self.mlflow_conn_id = mlflow_conn_id

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        conn = BaseHook.get_connection(self.mlflow_conn_id)
        if conn.login:
            self.secret_environment = {**self.secret_environment, "MLFLOW_TRACKING_USERNAME": conn.login,
                                       "MLFLOW_TRACKING_PASSWORD": conn.password or ""}
            self._mask_secrets()
            self._prepare(context)  # re-render the script: it now sources a secrets file


def _slurm_hook():
    from slurmflow.hooks.slurm import SlurmHook

    return SlurmHook()


@task(task_id="preflight")
def preflight(params: dict[str, Any] | None = None) -> str:
    """``sbatch --test-only`` with the run's resources: a bad partition/account/QOS fails here,
    before an image is built or anything is queued."""
    from slurmflow.sbatch import build_script, render_script

    params = params or get_current_context()["params"]
    hook = _slurm_hook()
    job_dir = f"{hook.job_root}/preflight/{uuid.uuid4().hex}"
    script = build_script(command="true", job_name="slurmflow-preflight", job_dir=job_dir,
                          options=sbatch_options(params, site_settings()))
    hook.stage(script, render_script(script), None)
    try:
        return hook.test_only(script.script_path)
    finally:
        hook.remove(job_dir)


@task(task_id="job_spec")
def job_spec(image: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's command and resources for this run's Params and pinned image.

    Also stages the registry credentials for the cluster user (mode 600), so the job can pull.
    """
    from slurmflow.hooks.registry import RegistryHook

    params = params or get_current_context()["params"]
    hook = _slurm_hook()
    auth_dir = f"{hook.home}/{AUTH_DIR}"
    hook.make_dirs([auth_dir])
    hook.run(["chmod", "700", auth_dir])
    for name, content in RegistryHook("registry_default").job_auth_files().items():
        hook.upload(f"{auth_dir}/{name}", content, mode=0o600)
    return training_job(params, image, site_settings(hook.home))


@task(task_id="register", retries=2)
def register(job: dict[str, Any], image: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the results off the cluster, then log + register them in MLflow (idempotent)."""
    from slurmflow.pipeline.results import collect
    from slurmflow.pipeline.results import register as register_run

    context = get_current_context()
    params = params or context["params"]
    hook = _slurm_hook()
    with tempfile.TemporaryDirectory(prefix="slurmflow-results-") as tmp:
        local = Path(tmp)
        manifest = collect(hook.ssh_hook.get_conn(), job["job_dir"], local)
        script = hook.run(["cat", job["script_path"]]).stdout
        result = register_run(
            manifest, local, run_key=run_key(context), job=job, image=image, sbatch_script=script,
            model_name=params.get("model_name") or f"slurmflow-{params['task']}",
            gpus_per_node=int(params.get("gpus_per_node") or 0),
            extra_tags={"airflow.dag_id": context["dag"].dag_id, "airflow.run_id": context["run_id"],
                        "code_version": (manifest.get("versions") or {}).get("git_sha") or "unknown"},
        )
    context["ti"].xcom_push(key="mlflow_run_url", value=result["run_url"])
    context["ti"].xcom_push(key="mlflow_model_url", value=result["model_url"])
    return {**result, "data": manifest.get("data"), "slurm": manifest.get("slurm")}


@task(task_id="catalog", retries=2, trigger_rule="all_done")
def catalog(train_task: str = "train", register_task: str = "register", image_task: str = "build_image") -> dict:
    """Record the run in the MongoDB catalog whatever its outcome, so failed runs are findable too.

    Runs after everything else (``all_done``) and reads what the other steps left in XCom.
    """
    from slurmflow.hooks.catalog import RunCatalogHook
    from slurmflow.pipeline.results import catalog_record

    context = get_current_context()
    ti = context["ti"]
    job = ti.xcom_pull(task_ids=train_task) or ti.xcom_pull(task_ids=train_task, key="slurm_job")
    registration = ti.xcom_pull(task_ids=register_task)
    image = ti.xcom_pull(task_ids=image_task)
    key = run_key(context)
    hook = RunCatalogHook()
    common = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "params": dict(context["params"])}
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
