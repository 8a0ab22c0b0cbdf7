"""hparam_sweep: a hyperparameter search submitted as throttled Slurm job arrays.

The search space (grid, or a seeded random sample, up to 10,000 trials) comes from the Params;
every trial is one array task in its own directory. A sweep larger than the cluster's
``MaxArraySize`` is split into several array jobs ("pieces", the mapped ``train`` task), run one
after another so that ``max_parallel`` holds across all of them. All trials are logged to MLflow
(nested under the sweep's summary run), the best completed one is registered, and a plot of the
metric against each hyperparameter is logged on the summary run. Failed trials are recorded;
the run fails only when more than ``max_failed_fraction`` of them failed.
Each logical date is a data window (the ``window_days`` days up to it), so
``airflow backfill create --dag-id hparam_sweep --from-date ... --to-date ...`` sweeps past
windows; ``max_active_runs`` keeps a backfill from flooding the cluster.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import tasks
from slurmflow.pipeline.params import draft7, hyperparameters, model_params, slurm_params
from slurmflow.retries import SERVICE_RETRIES

default_args = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=2)}
LOGICAL_DAY = "(dag_run.logical_date or dag_run.run_after) | ds"

params = draft7({
    **model_params("surrogate"),
    **hyperparameters(max_epochs=2),
    **slurm_params(),
    "search_space": Param(
        {"lr": [0.001, 0.003], "width": [32, 64]},
        type="object", section="Search",
        description="Hyperparameter -> list of values (lr, width, batch_size, max_epochs, seed).",
        properties={
            "lr": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "minItems": 1},
            "width": {"type": "array", "items": {"type": "integer", "minimum": 4, "maximum": 4096}, "minItems": 1},
            "batch_size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
            "max_epochs": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
            "seed": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        },
        additionalProperties=False, minProperties=1,
    ),
    "search_strategy": Param("grid", type="string", enum=["grid", "random"], section="Search",
                             description="grid: every combination; random: n_trials seeded draws."),
    "n_trials": Param(8, type="integer", minimum=1, maximum=10_000, section="Search",
                      description="Trials to draw (random strategy)."),
    "search_seed": Param(0, type="integer", minimum=0, section="Search", description="Seed of the random draws."),
    "max_parallel": Param(2, type="integer", minimum=1, maximum=1000, section="Search",
                          description="Array throttle: trials running at once (--array=0-N%K), across all array jobs."),
    "max_failed_fraction": Param(0.5, type="number", minimum=0, maximum=1, section="Search",
                                 description="The run fails when more than this share of trials failed; "
                                             "otherwise the best completed trial is registered."),
    "window_days": Param(3, type="integer", minimum=1, maximum=365, section="Data",
                         description="Data window: the campaign days up to the logical date."),
})


@dag(
    dag_id="hparam_sweep",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=params,
    default_args=default_args,
    tags=["training", "slurm", "sweep"],
    doc_md=__doc__,
)
def hparam_sweep():
    preflight = tasks.preflight()
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}",
                               **SERVICE_RETRIES)
    trials = tasks.plan_trials()
    window = {"valid": True, "holdout": False, "day": {
        "$gt": "{{ macros.ds_add(" + LOGICAL_DAY + ", -params.window_days) }}",
        "$lte": "{{ " + LOGICAL_DAY + " }}",
    }}
    spec = tasks.sweep_job_spec(image.output, trials, overrides={"data_query": window})
    # One mapped task per array job; one at a time (deferred ones count), so %K is the sweep's.
    train = tasks.TrainingJobOperator.partial(
        task_id="train", slurm_conn_id=tasks.CLUSTER_TEMPLATE, pool="slurm_submit", max_active_tis_per_dagrun=1, tolerate_failed_array_tasks=True,
    ).expand_kwargs(spec)
    sweep = tasks.register_sweep(train.output, image.output, trials)
    preflight >> [image, trials]
    train >> tasks.reap()
    spec >> train >> sweep >> tasks.catalog_sweep(sweep)


hparam_sweep()
