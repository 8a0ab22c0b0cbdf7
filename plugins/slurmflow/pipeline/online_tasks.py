"""The steps of ``online_training`` that differ from train_model's (the others are shared).

Parse-time light like :mod:`slurmflow.pipeline.tasks`: what the steps use is imported inside them.
"""

from __future__ import annotations

import secrets
from typing import Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import get_current_context, task

from slurmflow.pipeline.tasks import (
    TrainingJobOperator,
    cluster_hook,
    cluster_of,
    site_settings,
    slurm_would_accept,
    stage_registry_auth,
)
from slurmflow.secrets import JobSecrets, gather

#: the registered model's name when the ``model_name`` Param is empty
MODEL_NAME = "slurmflow-online"


@task(task_id="preflight")
def preflight() -> str:
    """The allocation fits: ``sbatch --test-only`` with every component's tasks (store, producers,
    trainer ranks), so an ensemble larger than the partition holds fails here, naming the sum."""
    from slurmflow.pipeline.online import resources_text, sbatch_options

    params = get_current_context()["params"]
    return slurm_would_accept(cluster_hook(params), lambda site: sbatch_options(params, site), cluster_of(params),
                              explain=resources_text(params))


@task(task_id="job_spec")
def job_spec(image: str) -> dict[str, Any]:
    """The job's command (store + producers + trainer) and resources for this run's Params."""
    from slurmflow.pipeline.online import online_job

    params = get_current_context()["params"]
    hook = cluster_hook(params)
    stage_registry_auth(hook)
    try:
        return online_job(params, image, site_settings(hook.home, cluster_of(params)))
    except ValueError as exc:
        raise AirflowFailException(f"invalid online job: {exc}") from exc


class OnlineJobOperator(TrainingJobOperator):
    """:class:`~slurmflow.pipeline.tasks.TrainingJobOperator` plus the staging store's password.

    A fresh random password per submission goes into the job's mode-600 secrets file (like the
    MLflow and Mongo credentials, masked everywhere); the store requires it and the producers and
    trainer present it. It never leaves the job's secrets: not in the DAG, XCom or the script.
    """

    def _gather_secrets(self) -> JobSecrets:
        from slurmflow.pipeline.online import STAGING_PASSWORD

        # Not into self.secret_environment: that is a templated field, and rendered fields are stored.
        try:
            return gather(self.secret_refs, {**self.secret_environment, STAGING_PASSWORD: secrets.token_urlsafe(32)})
        except ValueError as exc:
            raise AirflowFailException(f"invalid secrets for task {self.task_id}: {exc}") from exc
