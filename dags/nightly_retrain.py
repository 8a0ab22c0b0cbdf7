"""nightly_retrain: every night, retrain on the newest data and promote only a better model.

Trains the surrogate on every campaign document up to the logical date, registers the
challenger, evaluates it and the current champion (MLflow alias) on the same held-out documents,
and moves the alias only when the challenger is better by ``promotion_margin``; otherwise the
reason is tagged on the challenger's model version and recorded in the catalog. Idempotent per
logical date: a re-run re-attaches to (or reuses) the same Slurm job and model version.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import tasks
from slurmflow.pipeline.params import draft7, hyperparameters, model_params, slurm_params
from slurmflow.retries import SERVICE_RETRIES

default_args = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=5)}

params = draft7({
    **model_params("surrogate"),
    **hyperparameters(max_epochs=5),
    **slurm_params(),
    "alias": Param("champion", type="string", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", section="Promotion",
                   description="MLflow registered-model alias that marks the production model."),
    "promotion_margin": Param(0.0, type="number", minimum=0, maximum=1, section="Promotion",
                              description="Relative improvement of the held-out metric required to promote "
                                          "(0.02 = 2 % better)."),
})


@dag(
    dag_id="nightly_retrain",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=params,
    default_args=default_args,
    tags=["training", "slurm", "mlflow", "nightly"],
    doc_md=__doc__,
)
def nightly_retrain():
    preflight = tasks.preflight()
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}",
                               **SERVICE_RETRIES)
    # The newest data: every valid, non-held-out document up to the logical date.
    spec = tasks.job_spec(image.output, overrides={
        "data_query": {"valid": True, "holdout": False, "day": {"$lte": "{{ (dag_run.logical_date or dag_run.run_after) | ds }}"}},
    })
    train = tasks.TrainingJobOperator(task_id="train", slurm_conn_id=tasks.CLUSTER_TEMPLATE, command=spec["command"],
                                      sbatch_options=spec["sbatch_options"], pool="slurm_submit")
    registration = tasks.register(train.output, image.output)
    promotion = tasks.evaluate_and_promote(
        registration, alias="{{ params.alias }}", margin="{{ params.promotion_margin }}",
        holdout_query={"valid": True, "holdout": True},
    )
    preflight >> image
    train >> tasks.reap()
    spec >> train >> registration >> promotion >> tasks.catalog()


nightly_retrain()
