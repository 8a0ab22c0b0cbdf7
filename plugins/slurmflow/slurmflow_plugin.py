"""Airflow plugin registration for slurmflow.

Airflow's plugin loader imports every ``.py`` under ``plugins/`` as a top-level module named
after the file; ``plugins/slurmflow/.airflowignore`` therefore hides the package's other
modules from it (they are imported as ``slurmflow.*`` like any package), leaving this file,
whose name is unique. Registering the extra links lets the UI deserialize it for our operator.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowPlugin

from slurmflow.links import MlflowModelLink, MlflowRunLink, SlurmJobLink


class SlurmflowPlugin(AirflowPlugin):
    """Slurm over SSH: hook, submit operator, sensor, shared-poller trigger."""

    name = "slurmflow"
    operator_extra_links = [SlurmJobLink(), MlflowRunLink(), MlflowModelLink()]
