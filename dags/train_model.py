"""train_model: train one model on the Slurm cluster from the Airflow UI.

Trigger it with the form (every field validated; the defaults train a small surrogate on the
local stack). Steps: pre-flight (``sbatch --test-only``) -> build or reuse the training image ->
submit the job (exactly once) -> wait deferred, with the job's log in the task log -> copy the
results off the cluster and register the model in MLflow -> record the run in the Mongo catalog.

Experiment: ``config`` trains one of training/configs/*.yaml (your own model, README "Your own
model") with ``overrides`` such as ``--model.lr=0.001``; ``init_from`` (``models:/name/3``,
``models:/name@champion`` or a run id) continues a previous run from its last checkpoint, with
``init_mode`` resume (``max_epochs`` is the total) or weights (README "Continue a previous experiment").
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import tasks
from slurmflow.pipeline.params import train_params
from slurmflow.retries import SERVICE_RETRIES

default_args = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="train_model",
    schedule=None,
    catchup=False,
    params=train_params(),
    default_args=default_args,
    tags=["training", "slurm", "mlflow"],
    doc_md=__doc__,
    max_active_runs=4,
)
def train_model():
    preflight = tasks.preflight()
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}",
                               **SERVICE_RETRIES)
    spec = tasks.job_spec(image.output)
    train = tasks.TrainingJobOperator(
        task_id="train",
        slurm_conn_id=tasks.CLUSTER_TEMPLATE,
        command=spec["command"],
        sbatch_options=spec["sbatch_options"],
        pool="slurm_submit",
        execution_timeout=timedelta(hours=48),
    )
    registration = tasks.register(train.output, image.output)
    preflight >> image
    train >> tasks.reap()
    spec >> train >> registration >> tasks.catalog()


train_model()
