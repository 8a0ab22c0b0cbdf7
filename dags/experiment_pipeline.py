"""experiment_pipeline: prepare -> train -> evaluate, each stage a Slurm job that runs only when needed.

DVC's ``dvc.yaml`` pipeline (README "Staged pipelines"), with Slurm jobs Airflow waits for
(no ``sbatch -W`` in tmux). Each stage declares its params (the form's Prepare / Train /
Evaluate sections), its inputs (the upstream stages' outputs) and its outputs. A stage's key is
the hash of (code version = the image's content tag, its params, its inputs' content hashes); its
outputs live in a content-addressed cache on the cluster (Variable ``slurmflow_stage_cache``:
a path, or ``{"path", "group", "mode"}`` for a group-shared cache). A cached stage submits no
Slurm job and passes its entry on, so a changed param reruns exactly the stages downstream of it;
two runs computing the same key at once do the work once (``flock`` on the cluster). The
``report`` step logs one MLflow run with every stage's params and key and the held-out metrics
against the registered champion (``model_name``@``alias``); the catalog records the stage keys
and the dataset (``RunCatalogHook.runs_using_dataset``).

Trigger it by hand (the form), or backfill: ``airflow backfill create --dag-id experiment_pipeline
--from-date ... --to-date ... [--dag-run-conf '{"lr": 0.01}']``; runs of equal params share the cache.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import tasks
from slurmflow.pipeline.params import NAME, draft7, hyperparameters, optional, slurm_params
from slurmflow.pipeline.stage_tasks import StageJobOperator, catalog_pipeline, report, stage_spec
from slurmflow.pipeline.stages import STAGES
from slurmflow.retries import SERVICE_RETRIES

default_args = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)}

params = draft7({
    "rows": Param(4096, type="integer", minimum=16, maximum=10_000_000, section="Prepare",
                  description="prepare: training rows of the borehole table."),
    "holdout_rows": Param(1024, type="integer", minimum=16, maximum=10_000_000, section="Prepare",
                          description="prepare: held-out rows (another draw), what evaluate measures."),
    "data_seed": Param(0, type="integer", minimum=0, maximum=2**31 - 1, section="Prepare",
                       description="prepare: seed of the draws (the dataset's identity with rows and noise)."),
    "noise": Param(0.0, type="number", minimum=0, maximum=10, section="Prepare",
                   description="prepare: relative Gaussian noise on the target."),
    **hyperparameters(max_epochs=3),
    "eval_batch_size": Param(1024, type="integer", minimum=1, maximum=65536, section="Evaluate",
                             description="evaluate: batch size of the held-out evaluation."),
    "model_name": optional(NAME, section="Evaluate",
                           description="Registered model whose champion evaluate compares with; "
                                       "empty = slurmflow-surrogate."),
    "alias": Param("champion", type="string", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", section="Evaluate",
                   description="The champion's MLflow alias."),
    "experiment": Param("pipeline", type="string", pattern=NAME, section="Evaluate",
                        description="MLflow experiment of the pipeline's run."),
    **slurm_params(),
})


@dag(
    dag_id="experiment_pipeline",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    params=params,
    default_args=default_args,
    tags=["training", "slurm", "pipeline", "mlflow"],
    doc_md=__doc__,
)
def experiment_pipeline():
    preflight = tasks.preflight()
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}",
                               **SERVICE_RETRIES)
    preflight >> image
    previous = None
    for stage in STAGES:
        spec = stage_spec(stage)(image.output)
        job = StageJobOperator(task_id=stage, stage_spec=spec, slurm_conn_id=tasks.CLUSTER_TEMPLATE,
                               command=spec["command"], sbatch_options=spec["sbatch_options"], pool="slurm_submit",
                               execution_timeout=timedelta(hours=48))
        if previous is not None:
            previous >> spec  # a stage's key needs its inputs' content hashes
        spec >> job >> tasks.reap.override(task_id=f"reap_{stage}")(stage)
        previous = job
    previous >> report(image.output) >> catalog_pipeline()


experiment_pipeline()
