"""After the job: copy its results off the cluster, register them in MLflow, record them in the catalog.

The job directory's ``result.json`` (written by ``hpctrain``, schema in training/README.md) is
the source of truth. If the compute node could not reach MLflow, the job logged into an offline
store in its directory; it is copied here over SFTP and replayed into the server
(``hpctrain.offline.upload``). Registration is keyed by the run key, so repeating it changes nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slurmflow.errors import SlurmError
from slurmflow.hooks.catalog import RunCatalogHook
from slurmflow.hooks.mlflow import MlflowHook
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.parsing import SlurmParseError
from slurmflow.paths import SCRIPT_FILE_NAME
from slurmflow.states import SlurmState
from slurmflow.usage import JobUsage

log = logging.getLogger(__name__)

#: what the orchestrator copies back from a job directory (model weights stay in MLflow's store)
COLLECTED = ("result.json", "tracking.json", "config.yaml", "mlruns-offline")
#: what a single training also copies back and logs as artifacts (artifact folder -> job dir
#: entry): TensorBoard event files and the MLPerf log. Not a sweep's trials: a sweep of 1,000
#: trials stays one MLflow request per trial.
SIDE_LOGS = {"tensorboard": "tensorboard", "mlperf": "mlperf.log"}
#: the manifest's scalar facts logged as MLflow metrics besides the training's own
MANIFEST_METRICS = ("time_to_target_s",)
#: at most this long a registration waits for accounting to record its jobs' ends
ACCOUNTING_SETTLE_S = 20.0


class ResultMissingError(RuntimeError):
    """The job ended without a usable ``result.json``."""


def collect(slurm: SlurmHook, job_dir: str, local_dir: Path) -> dict[str, Any]:
    """Copy the job's results and its batch script (``job.sbatch``) into ``local_dir``, in one
    round trip; return the parsed, completed manifest.

    :param slurm: the cluster's hook.
    :param job_dir: the job directory on the cluster.
    :param local_dir: an empty local folder.
    :raises ResultMissingError: no ``result.json`` or a manifest that is not ``completed``.
    """
    slurm.download_matching(job_dir, [*COLLECTED, *SIDE_LOGS.values(), SCRIPT_FILE_NAME], local_dir)
    path = local_dir / "result.json"
    if not path.exists():
        raise ResultMissingError(f"the job wrote no result.json in {job_dir}: see the job log above")
    manifest = json.loads(path.read_text())
    if manifest.get("status") != "completed":
        raise ResultMissingError(f"result.json in {job_dir} says {manifest.get('status')!r}: {manifest.get('error')}")
    return manifest


_PARAM_KEY = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a param name


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 1}}`` -> ``{"model.lr": 1}``; lists, and mappings whose keys MLflow
    would refuse (a Mongo query's ``$lte``), become JSON values."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and all(_PARAM_KEY.match(str(k)) for k in item):
            flat.update(flatten(item, f"{name}."))
        elif isinstance(item, Mapping):
            flat[name] = json.dumps(item, sort_keys=True, default=str)
        else:
            flat[name] = json.dumps(item) if isinstance(item, list | tuple) else item
    return flat


def slurm_tags(job: Mapping[str, Any], image: str, gpus_per_node: int = 0) -> dict[str, str]:
    """Slurm facts for the MLflow run, the model version and the catalog."""
    elapsed = job.get("elapsed_seconds") or 0
    nodes = int(job.get("nodes") or 1)
    tags = {
        "slurm.job_id": job.get("job_id"),
        "slurm.state": job.get("state"),
        "slurm.node_list": job.get("node_list"),
        "slurm.elapsed_seconds": elapsed,
        "slurm.gpu_hours": round(elapsed * gpus_per_node * nodes / 3600, 4),
        "slurm.job_dir": job.get("job_dir"),
        "slurm.cluster": job.get("cluster"),
        "image": image,
    }
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def usage_of(slurm: SlurmHook | None, job_ids: list[str], expect: Sequence[str] | None = None,
             settle: float = ACCOUNTING_SETTLE_S, sleep: Callable[[float], None] = time.sleep) -> dict[str, JobUsage]:
    """What the jobs used, from accounting (:meth:`SlurmHook.usage`), or ``{}`` when it cannot
    say: usage facts add to a registration, they never fail one.

    slurmdbd records a job's end a moment after slurmctld ends it, so a registration that
    starts right at the end would read a job still ``RUNNING`` (or not yet there): this asks
    again, backing off, until every job in ``expect`` (default ``job_ids``) has a record of a
    finished run, for at most ``settle`` seconds; after that it takes what accounting has.

    :param expect: the ids (as Slurm prints them: ``123``, ``123_4``) that must have ended,
        e.g. the array tasks that ran; ``job_ids`` may name their arrays instead.
    """
    if slurm is None or not job_ids:
        return {}
    expect = list(job_ids if expect is None else expect)
    deadline, delay = time.monotonic() + settle, 0.5
    while True:
        try:
            found = slurm.usage(job_ids)
        except (SlurmError, SlurmParseError) as exc:
            log.warning("No usage figures for Slurm job(s) %s: %s", ", ".join(job_ids), exc)
            return {}
        waiting = [j for j in expect if j not in found or not SlurmState.parse(found[j].state)[0].ends_run]
        if not waiting:
            return found
        if time.monotonic() + delay > deadline:
            log.info("Accounting has not recorded the end of %d job(s) (%s...) after %.0f s: "
                     "their usage figures are left out or partial", len(waiting), waiting[0], settle)
            return found
        sleep(delay)
        delay = min(delay * 2, 4.0)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metrics_of(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Final metrics, the best ones as ``best/<name>``, and ``time_to_target_s`` when the run
    reached its quality target."""
    metrics = manifest.get("metrics") or {}
    out = {k: v for k, v in (metrics.get("final") or {}).items() if isinstance(v, int | float)}
    out.update({f"best/{k}": v for k, v in (metrics.get("best") or {}).items() if isinstance(v, int | float)})
    out.update({k: manifest[k] for k in MANIFEST_METRICS if _number(manifest.get(k))})
    out.update(online_metrics(manifest.get("data") or {}))
    return out


def online_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """``online/*`` metrics of a training fed by producers (``data.kind == "online"``, see
    hpctrain.data.online): what it consumed, from whom, and how fresh (put -> first use)."""
    if data.get("kind") != "online":
        return {}
    per_producer = [v for v in (data.get("batches_per_producer") or {}).values() if _number(v)]
    out = {"online/samples_consumed": data.get("samples_consumed"),
           "online/batches_consumed": data.get("batches_consumed"),
           "online/batches_per_producer": sum(per_producer) / len(per_producer) if per_producer else None,
           "online/batches_per_producer_min": min(per_producer) if per_producer else None,
           "online/dead_producers": len(data.get("dead_producers") or []),
           "online/staleness_p50_s": data.get("staleness_p50_s"),
           "online/staleness_p95_s": data.get("staleness_p95_s"),
           "online/wait_s": data.get("wait_s"), "online/fetch_s": data.get("fetch_s")}
    return {k: float(v) for k, v in out.items() if _number(v)}


def register(
    manifest: Mapping[str, Any],
    local_dir: Path,
    *,
    run_key: str,
    model_name: str,
    job: Mapping[str, Any],
    image: str,
    sbatch_script: str,
    extra_tags: Mapping[str, str] | None = None,
    gpus_per_node: int = 0,
    mlflow: MlflowHook | None = None,
    register_model: bool = True,
    slurm: SlurmHook | None = None,
) -> dict[str, Any]:
    """Put one finished training into MLflow (run, and a model version), idempotently.

    :param register_model: False logs the run only (a sweep registers just its best trial).
    :param slurm: the cluster's hook, to log the job's MLflow Model from here when the run
        lacks it (:func:`ensure_model_logged`); required with ``register_model``.
    :return: ``run_id``, ``experiment``, ``model_name``, ``model_version``, ``run_url``,
        ``model_url``, ``metrics``.
    """
    mlflow = mlflow or MlflowHook()
    tracking = manifest.get("mlflow") or {}
    experiment = tracking.get("experiment") or "slurmflow"
    run_id = tracking.get("run_id") if tracking.get("mode") == "online" else None
    if run_id is None and (local_dir / "mlruns-offline").is_dir():
        from hpctrain.offline import upload  # the compute node was offline: replay its store

        with mlflow.credentials():  # upload() builds its own MLflow clients
            run_id = upload(local_dir, mlflow.tracking_uri, experiment=experiment,
                            tags={"slurmflow.run_key": run_key})
    usage = usage_of(slurm, [str(job["job_id"])]).get(str(job["job_id"]))
    # sacct's measured figures (GPU-hours from AllocTRES among them) win over the estimate
    tags = {**slurm_tags(job, image, gpus_per_node), **(usage.as_tags() if usage else {}), **(extra_tags or {})}
    script = local_dir / "job.sh"
    script.write_text(sbatch_script)
    metrics = metrics_of(manifest)
    run_id = mlflow.log_training(
        experiment=experiment, run_key=run_key, run_name=run_key.replace("/", " "),
        params=flatten(manifest.get("hyperparameters") or {}), metrics=metrics, tags=tags,
        artifacts={"slurm": script, "result": local_dir / "result.json",
                   **{dest: local_dir / name for dest, name in SIDE_LOGS.items()}},  # skipped when absent
        run_id=run_id,
    )
    exp_id = mlflow.client.get_run(run_id).info.experiment_id
    result = {
        "run_id": run_id,
        "experiment": experiment,
        "model_name": model_name,
        "model_version": None,
        "run_url": mlflow.ui_url(f"experiments/{exp_id}/runs/{run_id}"),
        "model_url": None,
        "metrics": metrics,
        "tags": tags,
        "usage": usage.as_dict() if usage else None,
    }
    if register_model:
        ensure_model_logged(mlflow, run_id, slurm, job["job_dir"], local_dir)
        version = mlflow.register_model(model_name, run_id, "model", {**tags, "slurmflow.run_key": run_key})
        result.update(model_version=version, model_url=mlflow.ui_url(f"models/{model_name}/versions/{version}"))
    return result


def ensure_model_logged(mlflow: MlflowHook, run_id: str, slurm: SlurmHook, job_dir: str, local_dir: Path) -> None:
    """Make sure the run holds the job's MLflow Model under ``model/`` before it is registered.

    The training logs it itself when the server is reachable, and the offline replay brings it
    along otherwise; when neither happened (artifact upload failed mid-way), it is copied off
    the cluster here and logged from Airflow, so a version never points at a folder without
    ``MLmodel``.

    :raises ResultMissingError: the job directory has no MLflow Model either.
    """
    if any(f.path == "model/MLmodel" for f in mlflow.client.list_artifacts(run_id, "model")):
        return
    target = local_dir / "model"
    if not slurm.download(posixpath.join(job_dir, "model"), target):
        raise ResultMissingError(f"no model/ folder in {job_dir}")
    if not (target / "MLmodel").is_file():
        raise ResultMissingError(f"{job_dir}/model has no MLmodel: the job did not write an MLflow Model")
    mlflow.client.log_artifacts(run_id, str(target), "model")


def catalog_record(catalog: RunCatalogHook, run_key: str, state: str, *, job: Mapping[str, Any] | None = None,
                   registration: Mapping[str, Any] | None = None, image: str | None = None,
                   manifest: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Upsert the run's catalog document with whatever links are known."""
    fields: dict[str, Any] = dict(extra or {})
    if job:
        fields["slurm"] = {k: job.get(k) for k in ("job_id", "state", "node_list", "elapsed_seconds", "job_dir",
                                                    "log_path", "exit_code") if job.get(k) is not None}
    if image:
        fields["image"] = image
    if registration:
        fields["mlflow"] = {k: registration[k] for k in ("run_id", "experiment", "model_name", "model_version",
                                                         "run_url", "model_url")}
        fields["metrics"] = registration["metrics"]
        if registration.get("usage"):
            fields["usage"] = registration["usage"]
        if registration.get("code"):
            fields["code"] = registration["code"]
        if registration.get("data"):  # what it trained on (an online run: its producers, the dead ones)
            fields["data"] = registration["data"]
    if manifest:
        fields["data"] = manifest.get("data")
        fields["versions"] = manifest.get("versions")
    return catalog.record_run(run_key, state, fields)
