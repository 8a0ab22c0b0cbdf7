"""The result manifest (``<job_dir>/result.json``) that the orchestrator reads after a job.

The schema is documented in training/README.md; :data:`SCHEMA_VERSION` changes whenever a field
changes meaning. Writers go through :func:`write_manifest` (atomic), readers through
:func:`load_manifest` / :func:`is_complete`.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Literal

from hpctrain.job import JobDir, read_json, write_json_atomic

SCHEMA_VERSION = 1
Status = Literal["completed", "preempted", "failed"]

#: fields a completed manifest must have for the orchestrator to register the run
REQUIRED_WHEN_COMPLETE = ("metrics", "model", "data", "versions", "hyperparameters", "seed")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_manifest(job_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a job directory, or ``None`` when absent or unreadable.

    :param job_dir: the job directory.
    """
    return read_json(JobDir(Path(job_dir)).result)


def is_complete(manifest: dict[str, Any] | None) -> bool:
    """Whether a manifest records a finished training that need not run again.

    Smoke runs never count: they prove the pipeline, not a model.

    :param manifest: a parsed ``result.json`` (or ``None``).
    """
    if not manifest or manifest.get("status") != "completed" or manifest.get("smoke"):
        return False
    return all(manifest.get(key) is not None for key in REQUIRED_WHEN_COMPLETE)


def write_manifest(job: JobDir, manifest: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically (temporary file + rename).

    :param job: the job directory.
    :param manifest: the manifest; ``schema_version`` and ``written_at`` are added.
    """
    payload = {"schema_version": SCHEMA_VERSION, "written_at": utc_now(), **manifest}
    return write_json_atomic(job.result, payload)
