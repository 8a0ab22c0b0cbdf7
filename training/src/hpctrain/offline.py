"""Replaying a job's offline MLflow store into a tracking server.

When a compute node cannot reach MLflow, ``hpctrain fit`` logs into ``<job_dir>/mlruns-offline/``
(an MLflow file store). From a machine that can reach the server (the Airflow worker, the login
node), :func:`upload` copies the run: params, every metric value with its step and timestamp,
tags, artifacts, status and times. It returns the server-side run id.

Idempotent: the server run carries ``hpctrain.offline_run_id`` and, once everything is copied,
``hpctrain.upload_complete=true``; a second call finds it and returns the same id. A run left
half-copied by an interrupted upload is deleted and copied again.

Example (orchestrator side)::

    from hpctrain.offline import upload
    run_id = upload("/scratch/jobs/run-42", "http://mlflow:5000")  # credentials from the env
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hpctrain.job import JobDir, read_json
from hpctrain.tracking import TRACKING_STATE_FILE, allow_file_store

OFFLINE_RUN_TAG = "hpctrain.offline_run_id"
COMPLETE_TAG = "hpctrain.upload_complete"
UPLOADED_TAG = "hpctrain.uploaded_run_id"
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
_PARAMS_PER_BATCH = 100


@contextmanager
def _credentials(username: str | None, password: str | None) -> Iterator[None]:
    # MlflowClient reads basic-auth credentials from the environment only; set them for the
    # duration of the upload and put the previous values back.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if username is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = username
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _source_run(source: Any, job: JobDir) -> Any:
    """The job's run in the offline store: the one recorded by ``fit``, else the only one."""
    recorded = (read_json(job.state / TRACKING_STATE_FILE) or {}).get("run_id")
    experiments = source.search_experiments()
    runs = source.search_runs([e.experiment_id for e in experiments]) if experiments else []
    if recorded:
        for run in runs:
            if run.info.run_id == recorded:
                return run
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise FileNotFoundError(f"no MLflow run in {job.offline_store}")
    raise ValueError(f"{len(runs)} runs in {job.offline_store} and none recorded in {TRACKING_STATE_FILE}")


def _artifact_dir(job: JobDir, run: Any) -> Path | None:
    # The file store writes absolute artifact URIs; the job directory may have been copied
    # elsewhere since, so prefer the store's own layout (<exp>/<run>/artifacts).
    local = job.offline_store / run.info.experiment_id / run.info.run_id / "artifacts"
    if local.is_dir():
        return local
    parsed = urlparse(run.info.artifact_uri or "")
    if parsed.scheme == "file" and Path(unquote(parsed.path)).is_dir():
        return Path(unquote(parsed.path))
    return None


def _find_uploaded(dest: Any, experiment_id: str, offline_run_id: str) -> list[Any]:
    return dest.search_runs(
        [experiment_id],
        filter_string=f"tags.`{OFFLINE_RUN_TAG}` = '{offline_run_id}'",
        max_results=10,
    )


def upload(
    job_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    username: str | None = None,
    password: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Copy the job's offline MLflow run into a tracking server; return the server's run id.

    :param job_dir: the job directory (holding ``mlruns-offline/``), possibly copied off the cluster.
    :param tracking_uri: the MLflow server (default ``MLFLOW_TRACKING_URI``).
    :param experiment: destination experiment name (default: the offline run's experiment name).
    :param username: basic-auth user (default ``MLFLOW_TRACKING_USERNAME``).
    :param password: basic-auth password (default ``MLFLOW_TRACKING_PASSWORD``).
    :param tags: extra tags for the server run (e.g. the Airflow run id).
    :raises FileNotFoundError: no offline store or no run in it.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    job = JobDir(Path(job_dir).resolve())
    if not job.offline_store.is_dir():
        raise FileNotFoundError(f"no offline MLflow store at {job.offline_store}")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking URI: pass tracking_uri or set MLFLOW_TRACKING_URI")

    with allow_file_store(), _credentials(username, password):
        source = MlflowClient(tracking_uri=job.offline_store.as_uri())
        run = _source_run(source, job)
        src_id = run.info.run_id
        dest = MlflowClient(tracking_uri=uri)

        exp_name = experiment or source.get_experiment(run.info.experiment_id).name
        found = dest.get_experiment_by_name(exp_name)
        exp_id = found.experiment_id if found else dest.create_experiment(exp_name)

        for previous in _find_uploaded(dest, exp_id, src_id):
            if previous.data.tags.get(COMPLETE_TAG) == "true":
                return previous.info.run_id
            dest.delete_run(previous.info.run_id)  # half-copied by an interrupted upload

        run_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("hpctrain.upload")}
        run_tags.update(tags or {})
        run_tags[OFFLINE_RUN_TAG] = src_id
        run_tags["hpctrain.offline_store"] = str(job.offline_store)
        new = dest.create_run(
            exp_id, start_time=run.info.start_time, tags=run_tags, run_name=run.info.run_name
        )
        new_id = new.info.run_id

        params = [Param(k, v) for k, v in run.data.params.items()]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            dest.log_batch(new_id, params=params[i : i + _PARAMS_PER_BATCH])
        metrics: list[Any] = []
        for key in run.data.metrics:
            metrics += [
                Metric(m.key, m.value, m.timestamp, m.step) for m in source.get_metric_history(src_id, key)
            ]
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            dest.log_batch(new_id, metrics=metrics[i : i + _METRICS_PER_BATCH])

        artifacts = _artifact_dir(job, run)
        if artifacts is not None and any(artifacts.iterdir()):
            dest.log_artifacts(new_id, str(artifacts))

        status = run.info.status if run.info.status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
        dest.set_terminated(new_id, status=status, end_time=run.info.end_time)
        dest.log_batch(new_id, tags=[RunTag(COMPLETE_TAG, "true")])
        try:  # best effort: the store may be read-only on this side
            source.set_tag(src_id, UPLOADED_TAG, new_id)
            source.set_tag(src_id, "hpctrain.uploaded_to", uri)
        except Exception:  # noqa: BLE001 - the server-side tag is the real marker
            pass
        return new_id


def main(argv: list[str] | None = None) -> int:
    """``hpctrain upload --job-dir DIR [--tracking-uri URI] [--experiment NAME]``.

    Credentials come from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` only, never
    from the command line (argv is visible to every user of the machine).
    """
    parser = argparse.ArgumentParser(prog="hpctrain upload", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    extra = dict(t.split("=", 1) for t in args.tag if "=" in t)
    try:
        run_id = upload(args.job_dir, args.tracking_uri, args.experiment, tags=extra)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hpctrain upload: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": run_id}))
    return 0
