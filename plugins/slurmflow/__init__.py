"""slurmflow: Airflow extension that trains on Slurm clusters over SSH.

Layers, each talking only to the one below (see docs/CONTRACTS.md):

* pure helpers, no Airflow imports: :mod:`slurmflow.states` (job states),
  :mod:`slurmflow.parsing` (squeue/sacct/scontrol/sbatch output), :mod:`slurmflow.sbatch`
  (validated options, the Jinja sbatch template), :mod:`slurmflow.identity` (exactly-once key),
  :mod:`slurmflow.commands` and :mod:`slurmflow.logs` (quoted shell commands),
  :mod:`slurmflow.status` (status resolution, sans-I/O);
* hooks: :class:`slurmflow.hooks.slurm.SlurmHook` / ``SlurmAsyncHook`` (the only SSH I/O);
* operators and sensors: :class:`slurmflow.operators.slurm.SlurmSubmitJobOperator`,
  :class:`slurmflow.sensors.slurm.SlurmJobSensor`;
* triggers: :class:`slurmflow.triggers.slurm.SlurmJobTrigger` on the shared
  :mod:`slurmflow.poller`.

Import the classes from their modules; this package file stays free of Airflow imports so the
pure helpers load anywhere (tests, the login node, notebooks).
"""

from __future__ import annotations

__version__ = "0.1.0"
