"""Plain values the DAG-facing classes need when a DAG file is parsed: operator defaults, XCom keys.

No imports, on purpose. The dag-processor imports the operators every time it parses a DAG
file; the modules these values belong to (:mod:`slurmflow.sbatch`, :mod:`slurmflow.images`,
:mod:`slurmflow.identity`, :mod:`slurmflow.states`) compile regexes and build dataclasses on
import, which a parse does not need. Each of those modules re-exports its values from here, so
``from slurmflow.sbatch import DEFAULT_TEMPLATE`` and the like keep working.
"""

from __future__ import annotations

#: XCom key of the job record the submit operator pushes (job id, paths, identity...).
XCOM_JOB_KEY = "slurm_job"
#: XCom key of the log bytes a trigger has delivered (where a restarted trigger resumes).
XCOM_LOG_OFFSETS = "slurm_log_offsets"

#: The sbatch template of :mod:`slurmflow.sbatch`, in ``include/sbatch/``.
DEFAULT_TEMPLATE = "job.sh.j2"

#: Terminal Slurm states that earn an Airflow retry by default (``SlurmState`` values, checked by
#: a test): the job did nothing wrong, the machine did (a FAILED / TIMEOUT / OUT_OF_MEMORY job
#: would fail the same way again). PREEMPTED is a preemption that ended the job (PreemptMode=
#: CANCEL, or not requeueable); one that Slurm requeued never ends the wait: the task follows
#: the same job id. Used by :mod:`slurmflow.operators.outcome`.
DEFAULT_RETRY_STATES: frozenset[str] = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"})

#: The Dockerfile's own ``ARG BASE_IMAGE`` default: what users get without a local base image.
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"

#: Never part of the image: caches, local runs, VCS data, tests, and the experiment configs (they
#: travel with each job, so a config-only change reuses the image: slurmflow.pipeline.experiments).
#: Matched against each path component (directories are pruned) and against the relative path.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "training/configs",
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "build",
    "dist",
    "tests",
    "lightning_logs",
    "mlruns",
    "mlruns-offline",
    "outputs",
    ".ipynb_checkpoints",
    ".DS_Store",
)
