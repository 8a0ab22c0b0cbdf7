"""Slurm job states as one type, in the spirit of Databricks' ``RunState``.

Pure module (no Airflow imports): used by the parsers, the hook, the shared poller and the
operators alike, so every layer agrees on what "finished" and "succeeded" mean.

Preemption and requeue (submitit's rule: "not done"). ``REQUEUED``, ``REQUEUE_HOLD`` (waits for
a person to release it), ``SPECIAL_EXIT`` and ``PENDING`` after a requeue are live: the same job
id runs again, and the task follows it with a growing restart count. ``PREEMPTED`` is not
terminal by itself either: accounting (sacct) prints it for an *earlier run* of a job that
Slurm requeued (``PreemptMode=REQUEUE``) and, for a few seconds after the preemption, even as its
newest line while the controller already shows the job ``COMPLETING``/``PENDING``. It is the
job's end only when nothing can bring the job back, which :class:`JobState` records as
``ended``:

* the controller (squeue, scontrol) reports ``PREEMPTED``: it only does for a job it did not
  requeue (``PreemptMode=CANCEL``, or a job submitted with ``--no-requeue``); a job it requeues
  goes ``COMPLETING`` -> ``PENDING`` and is never shown preempted;
* accounting's newest line is ``PREEMPTED`` and the controller no longer lists the job as live
  (:mod:`slurmflow.status` decides this when it folds the two views).
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class SlurmState(enum.StrEnum):
    """Every job state Slurm reports (``squeue``, ``sacct`` and ``scontrol`` agree on these names)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    # Release-gated names (slurmflow.versions): a requeued scrontab job, 20.11 only; a job being
    # checked for an expedited requeue (--requeue=expedite), 25.11 on. Both come back: live.
    REQUEUED_CRON = "REQUEUED_CRON"
    EXPEDITING = "EXPEDITING"
    RESIZING = "RESIZING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    DEADLINE = "DEADLINE"
    REVOKED = "REVOKED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    COMPLETED = "COMPLETED"
    # Not a Slurm state: the job is not (or no longer) known to any source we asked. submitit's
    # lesson: UNKNOWN means "keep polling", never "finished".
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job will not run again without someone resubmitting or requeueing it by hand.

        ``PREEMPTED`` is not: Slurm may requeue the job (see the module docstring and
        :attr:`JobState.is_terminal`, which knows when a preempted job really ended).
        """
        return self in _TERMINAL

    @property
    def ends_run(self) -> bool:
        """This record is of a run that is over (its exit code is known): every terminal state,
        and ``PREEMPTED``, which Slurm may follow with a requeue of the same job id."""
        return self in _TERMINAL or self is SlurmState.PREEMPTED

    @property
    def is_live_in_controller(self) -> bool:
        """What squeue shows for a job that is still queued, running or coming back: the
        controller never shows a job it requeues as ``PREEMPTED``, so there that is the end."""
        return not self.ends_run and self is not SlurmState.UNKNOWN

    @property
    def is_successful(self) -> bool:
        return self is SlurmState.COMPLETED

    @property
    def is_active(self) -> bool:
        """Holds (or is about to hold) an allocation: worth streaming its log."""
        return self in _ACTIVE

    @classmethod
    def parse(cls, text: str) -> tuple[SlurmState, str]:
        """Parse a state as printed by squeue, sacct or scontrol.

        Accepts long names, the compact codes squeue prints with ``%t``, sacct's trailing ``+``
        (truncation marker) and details such as ``CANCELLED by 1000``.

        :param text: the raw state column.
        :return: ``(state, detail)``; unknown names give ``UNKNOWN`` with the text as detail.
        """
        raw = (text or "").strip()
        head, _, rest = raw.partition(" ")
        head = head.rstrip("+").upper()
        if head in cls.__members__:
            return cls[head], rest.strip()
        if head in _COMPACT:
            return _COMPACT[head], rest.strip()
        return cls.UNKNOWN, raw


_TERMINAL = frozenset(
    {
        SlurmState.NODE_FAIL,
        SlurmState.BOOT_FAIL,
        SlurmState.TIMEOUT,
        SlurmState.OUT_OF_MEMORY,
        SlurmState.DEADLINE,
        SlurmState.REVOKED,
        SlurmState.CANCELLED,
        SlurmState.FAILED,
        SlurmState.COMPLETED,
    }
)
_ACTIVE = frozenset(
    {
        SlurmState.CONFIGURING,
        SlurmState.RUNNING,
        SlurmState.COMPLETING,
        SlurmState.RESIZING,
        SlurmState.SUSPENDED,
        SlurmState.STOPPED,
        SlurmState.SIGNALING,
        SlurmState.STAGE_OUT,
    }
)
_COMPACT = {
    "PD": SlurmState.PENDING,
    "CF": SlurmState.CONFIGURING,
    "R": SlurmState.RUNNING,
    "CG": SlurmState.COMPLETING,
    "RQ": SlurmState.REQUEUED,
    "RH": SlurmState.REQUEUE_HOLD,
    "RF": SlurmState.REQUEUE_FED,
    "RC": SlurmState.REQUEUED_CRON,
    "RS": SlurmState.RESIZING,
    "S": SlurmState.SUSPENDED,
    "ST": SlurmState.STOPPED,
    "SI": SlurmState.SIGNALING,
    "SO": SlurmState.STAGE_OUT,
    "SE": SlurmState.SPECIAL_EXIT,
    "RD": SlurmState.RESV_DEL_HOLD,
    "PR": SlurmState.PREEMPTED,
    "NF": SlurmState.NODE_FAIL,
    "BF": SlurmState.BOOT_FAIL,
    "TO": SlurmState.TIMEOUT,
    "OOM": SlurmState.OUT_OF_MEMORY,
    "DL": SlurmState.DEADLINE,
    "RV": SlurmState.REVOKED,
    "CA": SlurmState.CANCELLED,
    "F": SlurmState.FAILED,
    "CD": SlurmState.COMPLETED,
}

# When array tasks end differently, the one reported for the whole array: the most telling
# failure first (a node failure explains a later FAILED, not the other way round). PREEMPTED
# here is a task that ended preempted (JobState.ended).
_FAILURE_PRECEDENCE = (
    SlurmState.NODE_FAIL,
    SlurmState.BOOT_FAIL,
    SlurmState.OUT_OF_MEMORY,
    SlurmState.TIMEOUT,
    SlurmState.DEADLINE,
    SlurmState.PREEMPTED,
    SlurmState.FAILED,
    SlurmState.REVOKED,
    SlurmState.CANCELLED,
)
# While some tasks still run, the state shown for the array: the "most alive" one.
_LIVE_PRECEDENCE = (
    SlurmState.RUNNING,
    SlurmState.COMPLETING,
    SlurmState.CONFIGURING,
    SlurmState.SIGNALING,
    SlurmState.STAGE_OUT,
    SlurmState.RESIZING,
    SlurmState.REQUEUED,
    SlurmState.REQUEUE_FED,
    SlurmState.PREEMPTED,
    SlurmState.SUSPENDED,
    SlurmState.STOPPED,
    SlurmState.PENDING,
    SlurmState.REQUEUE_HOLD,
    SlurmState.SPECIAL_EXIT,
    SlurmState.RESV_DEL_HOLD,
    SlurmState.UNKNOWN,
)


def aggregate_states(states: Iterable[SlurmState | JobState]) -> SlurmState:
    """One state for a job array from its tasks' states.

    Terminal only when every task is; then ``COMPLETED`` only when every task completed,
    otherwise the most telling failure. An empty input is ``UNKNOWN``. Pass :class:`JobState`
    values so that a task that ended preempted counts as ended (a bare ``PREEMPTED`` is live).
    """
    seen = [s if isinstance(s, JobState) else JobState(s) for s in states]
    if not seen:
        return SlurmState.UNKNOWN
    live = {s.state for s in seen if not s.is_terminal}
    if live:
        return next(s for s in _LIVE_PRECEDENCE if s in live)
    done = {s.state for s in seen}
    if done == {SlurmState.COMPLETED}:
        return SlurmState.COMPLETED
    return next(s for s in _FAILURE_PRECEDENCE if s in done)


_EXIT_RE = re.compile(r"^(-?\d+)(?::(\d+))?$")


def parse_exit_code(text: str | None) -> tuple[int | None, int | None]:
    """Split Slurm's ``exit:signal`` pair (``0:0``, ``1:0``, ``0:15``); blanks give ``None``."""
    if not text or not text.strip():
        return None, None
    match = _EXIT_RE.match(text.strip())
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None


@dataclass(frozen=True)
class JobState:
    """The state of one Slurm job (or one array task) as last observed.

    :param state: the Slurm state.
    :param reason: Slurm's reason or state detail (``Resources``, ``by 1000``, ``NonZeroExitCode``).
    :param exit_code: the batch script's exit code, once known.
    :param signal: the signal that ended the script, once known (0 for none).
    :param restarts: how often Slurm restarted the job (requeue, preemption, node failure).
    :param ended: a ``PREEMPTED`` state is the job's end, not a run that Slurm requeued (see the
        module docstring); set by the parsers for the controller's view and by the status fold.
    """

    state: SlurmState
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    restarts: int = 0
    ended: bool = False

    @property
    def is_terminal(self) -> bool:
        """The wait is over: a terminal state, or a preemption that nothing will requeue."""
        return self.state.is_terminal or (self.ended and self.state is SlurmState.PREEMPTED)

    def as_ended(self) -> JobState:
        """This state as the job's last word: a ``PREEMPTED`` one becomes terminal."""
        if self.state is SlurmState.PREEMPTED and not self.ended:
            return replace(self, ended=True)
        return self

    @property
    def is_successful(self) -> bool:
        return self.state.is_successful

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "restarts": self.restarts,
            "ended": self.ended,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobState:
        return cls(
            state=SlurmState(data["state"]),
            reason=data.get("reason", ""),
            exit_code=data.get("exit_code"),
            signal=data.get("signal"),
            restarts=int(data.get("restarts", 0)),
            ended=bool(data.get("ended", False)),
        )

    def __str__(self) -> str:
        text = self.state.value
        if self.reason and self.reason != "None":
            text += f" ({self.reason})"
        if self.exit_code is not None:
            text += f" exit={self.exit_code}:{self.signal or 0}"
        if self.restarts:
            text += f" restarts={self.restarts}"
        return text


@dataclass(frozen=True)
class ArrayProgress:
    """How the tasks of a job array are doing, for logs and the task's XCom.

    :param counts: tasks per state name.
    :param failed_tasks: array task ids whose terminal state is not ``COMPLETED``.
    """

    counts: dict[str, int] = field(default_factory=dict)
    failed_tasks: tuple[int, ...] = ()

    @classmethod
    def from_task_states(cls, states: Mapping[int, SlurmState | JobState]) -> ArrayProgress:
        jobs = {t: s if isinstance(s, JobState) else JobState(s) for t, s in states.items()}
        counts = Counter(s.state.value for s in jobs.values())
        failed = tuple(sorted(t for t, s in jobs.items() if s.is_terminal and not s.is_successful))
        return cls(counts=dict(sorted(counts.items())), failed_tasks=failed)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "failed_tasks": list(self.failed_tasks), "total": self.total}

    def __str__(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in self.counts.items()) or "no tasks"
