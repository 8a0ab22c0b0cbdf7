"""Who a Slurm job belongs to: the deterministic key behind exactly-once submission.

Pure module. A task instance (dag_id, run_id, task_id, map_index) maps to a key; the key's
digest and a *generation* number go into the job name, so that before submitting (and after
an unclear failure) the operator can ask Slurm "does a job for me already exist?" with an
exact ``--name`` filter that both ``squeue`` and ``sacct`` understand (sacct does not keep the
job comment unless ``AccountingStoreFlags=job_comment``; it always keeps the name).

Generations implement "a manual clear means run again": Airflow bumps a cleared task's
``max_tries`` to ``try_number + retries`` (``clear_task_instances``), so
``max_tries - retries`` is constant across the automatic retries of one clear and grows with
every clear. Airflow itself derives a clear's first try the same way
(``RuntimeTaskInstance.get_first_reschedule_date``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from slurmflow.constants import XCOM_JOB_KEY, XCOM_LOG_OFFSETS  # noqa: F401 (re-exported)
from slurmflow.states import JobState, SlurmState

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_NAME_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]*)\.(?P<digest>[0-9a-f]{12})\.g(?P<gen>\d+)$")
#: How many earlier generations a lookup asks about (names go on one command line).
MAX_LOOKBACK_GENERATIONS = 64


def safe_path_component(text: str, limit: int = 100) -> str:
    """A path component made of ``[A-Za-z0-9_.-]`` only (``manual__2024-01-01T00:00:00+00:00``
    becomes ``manual__2024-01-01T00_00_00_00_00``), never ``.`` or ``..``."""
    cleaned = _SAFE_RE.sub("_", text).strip(".")[:limit]
    return cleaned or "_"


def generation_of(max_tries: int | None, retries: int | None) -> int:
    """The clear generation of a task instance: 0 until its first manual clear.

    :param max_tries: ``ti.max_tries``.
    :param retries: the task's ``retries``.
    """
    return max(int(max_tries or 0) - int(retries or 0), 0)


@dataclass(frozen=True)
class JobKey:
    """The identity of one task instance's Slurm job.

    :param dag_id: the DAG id.
    :param run_id: the DAG run id.
    :param task_id: the task id.
    :param map_index: the map index (-1 for unmapped tasks).
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    @property
    def digest(self) -> str:
        # \x1f (unit separator) cannot appear in Airflow ids, so distinct keys never collide
        # by concatenation; 48 bits keep the name short and collisions astronomically unlikely.
        raw = "\x1f".join((self.dag_id, self.run_id, self.task_id, str(self.map_index)))
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def job_name(self, generation: int) -> str:
        """``<task_id>.<digest>.g<generation>``: readable in squeue, exact for lookups."""
        prefix = safe_path_component(self.task_id, limit=48)
        return f"{prefix}.{self.digest}.g{int(generation)}"

    def candidate_names(self, generation: int) -> list[str]:
        """Names of this key's jobs in the current and earlier generations, newest first."""
        first = max(0, int(generation) - MAX_LOOKBACK_GENERATIONS + 1)
        return [self.job_name(g) for g in range(int(generation), first - 1, -1)]

    def comment(self, generation: int) -> str:
        """Human-readable key for ``--comment`` (visible in ``squeue -o %k`` and scontrol)."""
        return (
            f"slurmflow dag={self.dag_id} run={self.run_id} task={self.task_id} "
            f"map={self.map_index} gen={int(generation)}"
        )

    def job_dir(self, root: str, generation: int) -> str:
        """The per-run job directory: attempts of one generation share it (checkpoints survive
        a retry); a clear gets a fresh one."""
        task = safe_path_component(self.task_id)
        if self.map_index >= 0:
            task = f"{task}.m{self.map_index}"
        parts = [
            root.rstrip("/") or "/",
            safe_path_component(self.dag_id),
            safe_path_component(self.run_id),
            task,
            f"g{int(generation)}",
        ]
        return "/".join(parts)

    def owns(self, job_name: str) -> bool:
        parsed = parse_job_name(job_name)
        return parsed is not None and parsed[0] == self.digest


@dataclass(frozen=True)
class JobIdentity:
    """One training: a task instance's :class:`JobKey` plus its clear generation.

    The single name behind everything one training leaves: the Slurm job name and comment, the
    job directory, the MLflow run key (tag ``slurmflow.run_key`` on the run and its model
    version) and the catalog document. A clear of the train task is a new generation, hence a
    new job, run, model version and catalog document; a retry, or a clear of a later step only,
    keeps the generation and finds everything again.

    :param key: the task instance.
    :param generation: the clear generation (:func:`generation_of`).
    """

    key: JobKey
    generation: int = 0

    @property
    def job_name(self) -> str:
        return self.key.job_name(self.generation)

    @property
    def comment(self) -> str:
        return self.key.comment(self.generation)

    def job_dir(self, root: str) -> str:
        return self.key.job_dir(root, self.generation)

    @property
    def run_key(self) -> str:
        """``<dag>/<run>/<task>/<map index>/g<generation>``: the MLflow and catalog key."""
        k = self.key
        return f"{k.dag_id}/{k.run_id}/{k.task_id}/{k.map_index}/g{int(self.generation)}"

    def trial_key(self, trial: int) -> str:
        """The run key of one array task (a sweep trial) of this job."""
        return f"{self.run_key}/trial-{int(trial)}"

    def as_dict(self) -> dict[str, str | int]:
        """Plain types for XCom and trigger kwargs."""
        k = self.key
        return {"dag_id": k.dag_id, "run_id": k.run_id, "task_id": k.task_id, "map_index": k.map_index,
                "generation": int(self.generation)}

    @classmethod
    def from_dict(cls, data: dict) -> JobIdentity:
        """Inverse of :meth:`as_dict` (the ``identity`` of a ``slurm_job`` XCom record)."""
        key = JobKey(str(data["dag_id"]), str(data["run_id"]), str(data["task_id"]), int(data.get("map_index", -1)))
        return cls(key, int(data.get("generation", 0)))


def parse_job_name(name: str) -> tuple[str, int] | None:
    """``(digest, generation)`` of a name made by :meth:`JobKey.job_name`, else ``None``."""
    match = _NAME_RE.match(name.strip())
    if not match:
        return None
    return match.group("digest"), int(match.group("gen"))


@dataclass(frozen=True)
class ExistingJob:
    """A job found by a key lookup, reduced to what the decision needs.

    :param job_id: the job (or array) id.
    :param generation: the generation encoded in its name.
    :param state: its state (aggregated over array tasks); a bare :class:`SlurmState` is taken
        as ``JobState(state)``. A JobState knows when a PREEMPTED job really ended.
    """

    job_id: str
    generation: int
    state: JobState

    def __post_init__(self) -> None:
        if isinstance(self.state, SlurmState):
            object.__setattr__(self, "state", JobState(self.state))


@dataclass(frozen=True)
class Decision:
    """What to do before (or instead of) submitting.

    :param action: ``attach`` to a live job, ``reuse`` a completed job's result, or ``submit``.
    :param job_id: the job to attach to or reuse.
    :param cancel: live jobs of earlier generations to ``scancel`` first (a clear whose cancel
        did not reach Slurm, e.g. because the triggerer was down).
    :param reason: one line for the task log.
    """

    action: Literal["attach", "reuse", "submit"]
    job_id: str | None = None
    cancel: tuple[str, ...] = ()
    reason: str = ""


def decide(generation: int, jobs: Iterable[ExistingJob]) -> Decision:
    """Exactly-once rule for one key.

    * a live job of this generation -> attach (a retry, a restarted worker or triggerer);
    * live jobs of other generations -> cancel them (a manual clear means "run again");
    * else the newest job of this generation COMPLETED -> reuse its result;
    * else (none, or the last one failed / was cancelled) -> submit anew.

    :param generation: the current clear generation (:func:`generation_of`).
    :param jobs: every job found for the key (any generation).
    """
    ordered: Sequence[ExistingJob] = sorted(jobs, key=lambda j: int(j.job_id), reverse=True)
    live = [j for j in ordered if not j.state.is_terminal]
    mine = [j for j in live if j.generation == generation]
    stale = tuple(j.job_id for j in live if j.generation != generation)
    if mine:
        extra = tuple(j.job_id for j in mine[1:])
        return Decision(
            "attach",
            mine[0].job_id,
            cancel=stale + extra,
            reason=f"re-attaching to live job {mine[0].job_id} ({mine[0].state.state.value})",
        )
    current = [j for j in ordered if j.generation == generation]
    if current and current[0].state.is_successful:
        return Decision(
            "reuse", current[0].job_id, cancel=stale, reason=f"job {current[0].job_id} already COMPLETED"
        )
    if current:
        reason = f"previous job {current[0].job_id} ended {current[0].state.state.value}; submitting anew"
    elif stale:
        reason = "cleared: cancelling the earlier generation's job and submitting anew"
    else:
        reason = "no earlier job for this task instance"
    return Decision("submit", None, cancel=stale, reason=reason)
