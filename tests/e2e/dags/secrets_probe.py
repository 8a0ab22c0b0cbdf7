"""e2e_secrets: a training job that prints every secret it holds (tests/e2e/test_secret_leaks.py).

Only the local stack loads it (its ``e2e-dags`` bundle); the product's dags/ never has it. The
steps are the real pipeline's (image, train, register, catalog) under the docker runtime; the
job prints each secret in its batch shell (``setup``) and in its container (a wrapper around the
training command), so the test can show them masked in the task and trigger logs - and absent
from everything else.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag, get_current_context, task

from slurmflow.operators.image import BuildImageOperator
from slurmflow.pipeline import tasks
from slurmflow.pipeline.params import train_params

#: the job's Mongo connection, with a password (the test creates it); the catalog keeps mongo_default
JOB_MONGO_CONN = "e2e_secrets_mongo"

# The batch shell: what it sourced from the secrets file, and the registry login staged for the pull.
SETUP = "\n".join([
    'echo "probe batch MONGO_URI=$MONGO_URI MLFLOW_TRACKING_PASSWORD=$MLFLOW_TRACKING_PASSWORD"',
    'sed -n "s/^/probe batch registry /p" "$HOME/.slurmflow/registry-auth/registry.env"',
    'grep -h auth "$HOME/.slurmflow/registry-auth/config.json" | sed "s/^/probe batch registry /"',
])
# The container (argv carries the names only; the values arrive by name in its environment).
# The pause leaves the test time to look at every process's argv while docker runs.
PROBE = ('echo "probe container MONGO_URI=$MONGO_URI MLFLOW_TRACKING_PASSWORD=$MLFLOW_TRACKING_PASSWORD"; '
         'sleep 8; exec "$@"')


@task(task_id="job_spec")
def probe_spec(image: str) -> dict[str, Any]:
    """The training job of train_model, its command wrapped in :data:`PROBE`, always under docker."""
    from slurmflow.pipeline.experiments import read_config, stage_config_lines
    from slurmflow.pipeline.jobs import config_name, container_options, sbatch_options, training_argv
    from slurmflow.runtimes import container_command

    params = get_current_context()["params"]
    hook = tasks._slurm_hook()
    tasks.stage_registry_auth(hook)
    site = tasks.site_settings(hook.home)
    argv = ["sh", "-c", PROBE, "probe", *training_argv(params)]
    command = container_command("docker", image, argv, workdir="$SLURMFLOW_JOB_DIR", **container_options(params, site))
    command = "\n".join([*stage_config_lines(read_config(config_name(params))), command])  # the config travels
    return {"command": command, "sbatch_options": sbatch_options(params, site)}


@dag(dag_id="e2e_secrets", schedule=None, catchup=False, params=train_params(), tags=["e2e"],
     default_args={"owner": "ml-platform", "retries": 0}, doc_md=__doc__)
def e2e_secrets():
    image = BuildImageOperator(task_id="build_image", base_image="{{ var.value.slurmflow_base_image }}")
    spec = probe_spec(image.output)
    train = tasks.TrainingJobOperator(task_id="train", command=spec["command"], sbatch_options=spec["sbatch_options"],
                                      setup=SETUP, mongo_conn_id=JOB_MONGO_CONN, poll_interval=1.0,
                                      max_poll_interval=2.0)
    spec >> train >> tasks.register(train.output, image.output) >> tasks.catalog()


e2e_secrets()
