"""Operator extra links: the Slurm job's page, and the MLflow run and model version of a training.

``Slurm job``: the Slurm job's page, when the site has one (Open OnDemand, a portal).

Airflow 3 evaluates extra links on the worker when the task finishes and stores the URL in
XCom; the link reads the ``url`` the operator recorded in its ``slurm_job`` XCom, built from
the connection extra ``job_url_template`` (e.g.
``https://ondemand.example.org/pun/sys/dashboard/activejobs?jobid={job_id}``). Without a
template the button stays disabled; the job id is always in the ``slurm_job`` XCom.

``MLflow run`` / ``MLflow model``: on the register step (:func:`slurmflow.pipeline.tasks.register`),
the URLs it pushed as XCom ``mlflow_run_url`` / ``mlflow_model_url``.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom

from slurmflow.constants import XCOM_JOB_KEY


class SlurmJobLink(BaseOperatorLink):
    """Link to the Slurm job of a ``SlurmSubmitJobOperator`` task."""

    name = "Slurm job"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        record = XCom.get_value(ti_key=ti_key, key=XCOM_JOB_KEY)
        if isinstance(record, dict):
            return str(record.get("url") or "")
        return ""


class _XComUrlLink(BaseOperatorLink):
    """A link whose URL the task pushed as an XCom string under :attr:`url_key`."""

    url_key = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        value = XCom.get_value(ti_key=ti_key, key=self.url_key)
        return value if isinstance(value, str) else ""


class MlflowRunLink(_XComUrlLink):
    """The MLflow run a register step logged the training into."""

    name = "MLflow run"
    url_key = "mlflow_run_url"


class MlflowModelLink(_XComUrlLink):
    """The model version a register step created (or found)."""

    name = "MLflow model"
    url_key = "mlflow_model_url"


def job_url(template: str | None, job_id: str, cluster: str = "") -> str:
    """Fill a ``job_url_template`` (``{job_id}``, ``{cluster}``); empty without a template."""
    if not template:
        return ""
    try:
        return template.format(job_id=job_id, cluster=cluster)
    except (KeyError, IndexError, ValueError):
        return ""
