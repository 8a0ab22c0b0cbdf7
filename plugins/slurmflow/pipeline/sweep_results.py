"""After a sweep: every trial's results off the cluster and into MLflow, at the scale of thousands.

A trial costs the tracking server one request here (a ``log_batch`` of params, metrics and
tags) and the cluster nothing of its own: each piece's trial directories
come back in one tar stream (:meth:`~slurmflow.hooks.slurm.SlurmHook.download_matching`),
the trials' runs are looked up a few hundred per search, and the trials are logged from a
thread pool. What every trial shares (the sbatch script of its piece) and every trial's
``result.json`` (``sweep/manifests.jsonl``) are logged once, on the sweep's summary run, which is
the trial runs' parent in MLflow's UI.

Idempotent like a single training's registration: a trial run that already carries its run key
(the tag goes in the same ``log_batch`` as its metrics) is left as it is.

Failed trials (no complete ``result.json``) are recorded with their Slurm state, reason and the
tail of their log; the sweep fails only when more than ``max_failed_fraction`` of them failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurmflow.hooks.mlflow import RUN_KEY_TAG, MlflowHook
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.pipeline.results import COLLECTED, flatten, metrics_of, slurm_tags

if TYPE_CHECKING:
    from slurmflow.usage import JobUsage, UsageSummary

#: trial runs logged at once (each call is a short HTTP request; the server is the limit)
PARALLEL_TRIALS = 8
#: failed trials whose log tail is read (one SSH round trip each); the rest name their log file
MAX_TAILS = 20
TAIL_BYTES = 4000
SWEEP_TAG = "slurmflow.sweep"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the trials under the summary run


@dataclass
class Trial:
    """One trial of a sweep, as the cluster left it.

    :param index: its number in the sweep (``trial-<index>``).
    :param params: the hyperparameters it varied.
    :param piece: the train task's map index that ran it; ``job``: that piece's result record.
    :param array_task: its array task id within the piece.
    """

    index: int
    params: Mapping[str, Any]
    piece: int
    job: Mapping[str, Any]
    array_task: int
    manifest: dict[str, Any] | None = None
    local: Path | None = None
    state: str = ""
    reason: str = ""
    log_tail: str = ""
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    usage: JobUsage | None = None

    @property
    def slurm_job_id(self) -> str:
        """``<array job>_<task>``, as Slurm names the trial's run."""
        return f"{self.job['job_id']}_{self.array_task}"

    @property
    def job_dir(self) -> str:
        return f"{self.job['job_dir']}/trial-{self.index}"

    @property
    def completed(self) -> bool:
        return bool(self.manifest) and self.manifest.get("status") == "completed"

    def summary(self) -> dict[str, Any]:
        """What the summary run's ``trials.json``, the XCom and the catalog keep of it."""
        out: dict[str, Any] = {"trial": self.index, "params": dict(self.params), "piece": self.piece,
                               "slurm_job_id": self.slurm_job_id}
        if self.usage:
            out["usage"] = self.usage.as_dict()
        if self.completed:
            out.update(status="completed", run_id=self.run_id, metrics=self.metrics)
        else:
            out.update(status="failed", state=self.state, reason=self.reason, log_tail=self.log_tail,
                       run_id=self.run_id)
        return out


def layout(pieces: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]]) -> list[Trial]:
    """Which piece (train map index) and array task ran each trial: pieces hold consecutive
    trials in map-index order, as many as their array has tasks.

    :raises ValueError: the pieces do not hold exactly the planned trials.
    """
    out: list[Trial] = []
    for number, job in enumerate(pieces):
        count = int((job.get("array") or {}).get("total") or 0)
        for task in range(count):
            index = len(out)
            if index >= len(trials):
                break
            out.append(Trial(index, trials[index], number, job, task))
    if len(out) != len(trials):
        raise ValueError(f"the sweep's array jobs ran {len(out)} trials, but {len(trials)} were planned")
    return out


def collect(slurm: SlurmHook, trials: Sequence[Trial], local: Path) -> None:
    """Copy every trial's results off the cluster, one tar stream per piece; read the manifests."""
    by_piece: dict[int, list[Trial]] = {}
    for trial in trials:
        by_piece.setdefault(trial.piece, []).append(trial)
    for piece, members in by_piece.items():
        root = local / f"piece-{piece}"
        slurm.download_matching(members[0].job["job_dir"], [f"trial-*/{name}" for name in COLLECTED], root)
        for trial in members:
            trial.local = root / f"trial-{trial.index}"
            path = trial.local / "result.json"
            trial.manifest = json.loads(path.read_text()) if path.is_file() else None


def explain_failures(slurm: SlurmHook, trials: Sequence[Trial]) -> None:
    """Give each failed trial its Slurm state and reason (one query for all pieces) and, for
    the first :data:`MAX_TAILS`, the tail of its log."""
    from slurmflow.paths import JobPaths

    failed = [t for t in trials if not t.completed]
    if not failed:
        return
    snaps = slurm.get_states(sorted({str(t.job["job_id"]) for t in failed}))
    for n, trial in enumerate(failed):
        snap = snaps.get(str(trial.job["job_id"]))
        task = snap.tasks.get(trial.array_task) if snap else None
        manifest_error = (trial.manifest or {}).get("error")
        trial.state = task.state.value if task else "UNKNOWN"
        exit_code = f", exit code {task.exit_code}" if task and task.exit_code is not None else ""
        trial.reason = str(manifest_error or (f"{task.reason}{exit_code}" if task else "no result.json"))
        paths = trial.job.get("paths")
        log = JobPaths.from_dict(paths).log(str(trial.job["job_id"]), trial.array_task) if paths else None
        if log and n < MAX_TAILS:
            trial.log_tail = slurm.tail(log, TAIL_BYTES).decode("utf-8", "replace")
        elif log:
            trial.log_tail = f"(see {log})"


@dataclass(frozen=True)
class SweepContext:
    """What every trial run of one sweep is tagged with.

    :param sweep_key: the sweep's key (tag ``slurmflow.sweep`` on every run).
    :param summary_run_id: the parent run.
    :param image: the pinned image; ``tags``: DAG, run and code facts.
    """

    sweep_key: str
    summary_run_id: str
    image: str
    tags: Mapping[str, str]


def usage(slurm: SlurmHook, trials: Sequence[Trial]) -> UsageSummary | None:
    """Each trial's usage figures from one ``sacct`` for all pieces (set on the trials), and
    their sum for the sweep; None when accounting cannot say."""
    from slurmflow.pipeline.results import usage_of
    from slurmflow.usage import summarize

    # Wait for the trials that ran; one cancelled before it started has no record of its own.
    ran = [t.slurm_job_id for t in trials if t.completed or t.state not in ("", "CANCELLED", "UNKNOWN")]
    found = usage_of(slurm, sorted({str(t.job["job_id"]) for t in trials}), expect=ran)
    for trial in trials:
        trial.usage = found.get(trial.slurm_job_id)
    measured = [t.usage for t in trials if t.usage]
    return summarize(measured) if measured else None


def log_trials(mlflow: MlflowHook, trials: Sequence[Trial], sweep: SweepContext, experiment_id: str,
               upload_offline: Callable[[Trial], str] | None = None, parallel: int = PARALLEL_TRIALS) -> None:
    """Log every completed trial onto its run (the training's own live run when it had one),
    from a thread pool; set ``run_id`` and ``metrics`` on each.

    One request per trial (a ``log_batch``): the trials' manifests go to the summary run in one
    file (:func:`write_manifests`), not as an upload per trial, which halved a 1,000-trial
    registration on the one-worker MLflow server.

    :param upload_offline: replays a trial's offline MLflow store (a compute node without
        network), returning the new run's id.
    """
    done = [t for t in trials if t.completed]
    for trial in done:
        trial.metrics = metrics_of(trial.manifest)
    live_ids = [rid for t in done if (rid := _live_run_id(t.manifest))]
    runs = mlflow.runs_by_id([experiment_id], live_ids)
    # A retry finds the runs it logged already: they carry the sweep's tag and their run key.
    keyed = {r.data.tags.get(RUN_KEY_TAG): r for r in mlflow.runs_by_tag([experiment_id], SWEEP_TAG, sweep.sweep_key)}

    def one(trial: Trial) -> None:
        key = f"{sweep.sweep_key}/trial-{trial.index}"
        run = keyed.get(key) or runs.get(_live_run_id(trial.manifest) or "")
        if run is None and upload_offline and (trial.local / "mlruns-offline").is_dir():
            run = mlflow.client.get_run(upload_offline(trial))
        if run is None:
            run = mlflow.client.create_run(experiment_id, run_name=key.replace("/", " "))
        trial.run_id = run.info.run_id
        if run.data.tags.get(RUN_KEY_TAG) == key:
            return
        job = {**trial.job, "job_id": trial.slurm_job_id, "job_dir": trial.job_dir}
        measured = trial.usage.as_tags() if trial.usage else {}
        tags = {**slurm_tags(job, sweep.image), **measured, **sweep.tags, SWEEP_TAG: sweep.sweep_key,
                "slurmflow.trial": str(trial.index), PARENT_TAG: sweep.summary_run_id, RUN_KEY_TAG: key}
        mlflow.log_outcome(run, params=flatten(trial.manifest.get("hyperparameters") or {}),
                           metrics=trial.metrics, tags=tags)

    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="sweep-trial") as pool:
        list(pool.map(one, done))  # list(): the first error raises here


def write_manifests(trials: Sequence[Trial], path: Path) -> Path:
    """Every completed trial's ``result.json`` as one JSON line (``{"trial": i, "manifest": ...}``):
    the summary run's record of what each training wrote."""
    with path.open("w") as out:
        for trial in trials:
            if trial.completed:
                out.write(json.dumps({"trial": trial.index, "manifest": trial.manifest}, sort_keys=True) + "\n")
    return path


def _live_run_id(manifest: Mapping[str, Any] | None) -> str | None:
    tracking = (manifest or {}).get("mlflow") or {}
    return tracking.get("run_id") if tracking.get("mode") == "online" else None


def failed_fraction(trials: Sequence[Trial]) -> float:
    return sum(not t.completed for t in trials) / len(trials) if trials else 0.0
