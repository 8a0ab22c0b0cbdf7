"""Live metrics to MLflow when the server is reachable, to an offline store when it is not.

Compute nodes often cannot reach the tracking server. Rather than failing (or hanging in
retries) mid-run, the job probes the server once at startup with a short timeout and, when it does
not answer, logs to an MLflow file store in ``<job_dir>/mlruns-offline/``, which
:func:`hpctrain.offline.upload` later replays into the server from a machine that can reach it.

A job keeps one MLflow run across Slurm requeues: the run id is remembered in
``<job_dir>/.hpctrain/tracking.json`` and reused while the same store is available.
"""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from hpctrain.job import JobDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

TrackingSetting = Literal["auto", "online", "offline", "off"]
TRACKING_STATE_FILE = "tracking.json"


@contextmanager
def allow_file_store() -> Iterator[None]:
    """Let MLflow 3 open its file store, which it refuses by default ("maintenance mode").

    The file store needs nothing but a directory (no SQL driver: the job image has only
    ``mlflow-skinny``), which is what an offline compute node can offer.
    """
    previous = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = previous


def file_store_uri(job: JobDir) -> str:
    """``file:`` URI of the job's offline store."""
    return job.offline_store.as_uri()


def probe(
    tracking_uri: str,
    timeout: float = 3.0,
    username: str | None = None,
    password: str | None = None,
) -> tuple[bool, str]:
    """Check, with one short request, that an MLflow server answers its REST API.

    Authenticated with HTTP basic auth from the arguments or ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``; a server that rejects the credentials counts as unusable (a
    run that would fail at its first metric is worse than an offline one).

    :param tracking_uri: ``http(s)://host:port``.
    :param timeout: seconds for connect + response.
    :param username: basic-auth user (default from the environment).
    :param password: basic-auth password (default from the environment).
    :returns: ``(usable, reason)``.
    """
    url = tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url)
    username = username if username is not None else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password if password is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code} from {tracking_uri}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{tracking_uri} unreachable: {reason}"


@dataclass
class TrackingTarget:
    """Where this attempt logs.

    :param mode: ``online`` (a server or local store given by the user), ``offline`` (the job's
        file store, to upload later) or ``off``.
    :param tracking_uri: the MLflow tracking URI used (``None`` when off).
    :param reason: why this mode was chosen (goes into the manifest).
    :param run_id: the MLflow run to continue, when a previous attempt created one.
    """

    mode: Literal["online", "offline", "off"]
    tracking_uri: str | None
    reason: str
    run_id: str | None = None


def choose_target(
    job: JobDir,
    setting: TrackingSetting = "auto",
    tracking_uri: str | None = None,
    probe_timeout: float = 3.0,
) -> TrackingTarget:
    """Decide where to log: reachable server, else offline store; keep a previous attempt's run.

    :param job: the job directory.
    :param setting: ``auto`` (server if reachable, else offline), ``online`` (server or fail),
        ``offline`` (always the file store) or ``off``.
    :param tracking_uri: the server; default ``MLFLOW_TRACKING_URI``.
    :param probe_timeout: seconds for the reachability probe.
    :raises RuntimeError: ``online`` was required and the server is not usable.
    """
    if setting == "off":
        return TrackingTarget("off", None, "tracking disabled (run.tracking=off)")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    offline = TrackingTarget("offline", file_store_uri(job), "")
    previous = read_json(job.state / TRACKING_STATE_FILE) or {}

    if setting == "offline" or not uri:
        offline.reason = "run.tracking=offline" if setting == "offline" else "MLFLOW_TRACKING_URI unset"
        target = offline
    elif setting == "auto" and previous.get("mode") == "offline" and previous.get("run_id"):
        # An earlier attempt of this job logged offline: keep logging into that run, so the job
        # stays one run (uploaded later) instead of being split over two stores.
        offline.reason = "continuing the offline run of an earlier attempt"
        target = offline
    elif not uri.startswith(("http://", "https://")):
        target = TrackingTarget("online", uri, "local tracking URI, no probe needed")
    else:
        usable, why = probe(uri, timeout=probe_timeout)
        if usable:
            target = TrackingTarget("online", uri, f"server reachable ({why})")
        elif setting == "online":
            raise RuntimeError(f"run.tracking=online but the MLflow server is not usable: {why}")
        else:
            offline.reason = f"server not usable, logging offline: {why}"
            target = offline

    # Continue the previous attempt's run when it lives in the store chosen now.
    if previous.get("run_id") and previous.get("tracking_uri") == target.tracking_uri:
        target.run_id = previous["run_id"]
    return target


def remember_run(job: JobDir, target: TrackingTarget, run_id: str, experiment_id: str | None) -> None:
    """Record the run id so a requeued attempt logs into the same MLflow run."""
    write_json_atomic(
        job.state / TRACKING_STATE_FILE, {**asdict(target), "run_id": run_id, "experiment_id": experiment_id}
    )


def make_logger(target: TrackingTarget, experiment: str, run_name: str | None, tags: dict[str, str]) -> Any:
    """An ``MLFlowLogger`` for ``target`` (``None`` when tracking is off).

    :param target: from :func:`choose_target`.
    :param experiment: MLflow experiment name.
    :param run_name: MLflow run name (new runs only).
    :param tags: tags for a new run (Slurm job id, data identity, ...).
    """
    if target.mode == "off":
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    if target.mode == "offline":
        # Set for the whole training process: the logger opens the store lazily, on rank 0, at
        # the first metric, far from any context manager we could hold here.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=target.tracking_uri,
        tags=tags,
        run_id=target.run_id,
    )
