"""online_training: train while simulation replicas stream data in (SmartSim's online training).

One Slurm job holds a Redis staging store, an ensemble of ``replicas`` x ``ranks_per_replica``
producers that put a batch every ``interval_s`` for ``rounds`` rounds, and a trainer of
``trainer_ranks`` DDP ranks that picks up every new batch at each epoch end and stops once every
producer is done (or dead) and every batch was used. Steps: preflight (the allocation fits the
partition) -> build or reuse the training image -> submit the job (exactly once) -> wait deferred,
with every component's lines in the task log -> register the model and the ``online/*`` metrics in
MLflow -> record the run, dead producers included, in the Mongo catalog.

How a SmartSim experiment maps onto these Params: README, "Online training".
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import online_tasks, tasks
from slurmflow.pipeline.params import online_params
from slurmflow.retries import SERVICE_RETRIES

default_args = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="online_training",
    schedule=None,
    catchup=False,
    params=online_params(),
    default_args=default_args,
    tags=["training", "slurm", "mlflow", "online"],
    doc_md=__doc__,
    max_active_runs=4,
)
def online_training():
    preflight = online_tasks.preflight()
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}",
                               **SERVICE_RETRIES)
    spec = online_tasks.job_spec(image.output)
    train = online_tasks.OnlineJobOperator(
        task_id="train",
        slurm_conn_id=tasks.CLUSTER_TEMPLATE,
        command=spec["command"],
        sbatch_options=spec["sbatch_options"],
        pool="slurm_submit",
        execution_timeout=timedelta(hours=48),
    )
    registration = tasks.register(train.output, image.output, default_model=online_tasks.MODEL_NAME)
    preflight >> image
    train >> tasks.reap()
    spec >> train >> registration >> tasks.catalog()


online_training()
