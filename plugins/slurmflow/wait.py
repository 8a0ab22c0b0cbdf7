"""The one answer to "is the wait over?": a pure, step-by-step wait engine.

Sans-I/O, like :func:`slurmflow.status.resolve_states`: the engine is fed snapshots, log chunks
and the clock, and returns decisions; its drivers do the I/O:

* the trigger (:mod:`slurmflow.triggers.slurm`), fed by the triggerer's shared poller,
* the blocking waiter (:mod:`slurmflow.operators.waiting`), for ``deferrable=False``,
* the sensor's pokes (:mod:`slurmflow.sensors.slurm`), one step per poke, its state kept in
  Airflow's task state store between reschedules.

The rules, each written only here:

* **Done** is a terminal state (:attr:`slurmflow.states.JobState.is_terminal`: a preemption
  that Slurm requeues is not); ``UNKNOWN`` never is. A job unknown to squeue, sacct and scontrol for ``missing_grace`` seconds ends the
  wait as ``missing`` (wrong id, another cluster, purged from accounting).
* **Cancel the rest**: with ``cancel_array_on_failure``, the first failed array task asks once
  for the remaining tasks to be cancelled.
* **A failure brings its log tail**: the first task that failed on its own (else the first
  cancelled one), its last ``tail_lines`` lines.
* **Log lines are delivered once**: whole lines only; :attr:`WaitEngine.delivered` is the byte
  offset after the last whole line handed out, so a driver that restarts from it neither
  repeats nor skips a line.
* **Pacing**: :func:`next_interval` backs off :data:`BACKOFF`x per quiet round and doubles per
  failure, between the fastest and slowest interval; any change polls fast again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from slurmflow.logs import DEFAULT_CHUNK_BYTES, LogChunk, LogRead, complete_lines, tail_lines
from slurmflow.paths import JobPaths
from slurmflow.states import JobState, SlurmState
from slurmflow.status import JobSnapshot

WaitStatus = Literal["success", "failed", "timeout", "missing", "error"]


def out_of_patience(failures: int, failing_for: float, limit: int, patience: float) -> bool:
    """Whether failed polls end a wait (as ``error``): ``limit`` of them in a row, spanning at
    least ``patience`` seconds. Both: a count alone ran out after ~150 s of backed-off polls, so
    an sshd outage of 2.5 min failed a task whose job ran on (its retry then adopted the job and
    showed its log a second time: chaos, stop-sshd while deferred); a login node down for longer
    still ends the wait with the cause."""
    return failures >= limit and failing_for >= patience


@dataclass(frozen=True)
class WaitSettings:
    """How to wait for one job: every knob in one object, passed through every layer as is.

    :param poll_interval: fastest poll interval, seconds.
    :param max_poll_interval: slowest poll interval while nothing changes, seconds.
    :param deadline: UNIX time after which the wait ends as ``timeout`` (``None``: never).
    :param missing_grace: seconds a job may be unknown to Slurm before the wait ends as ``missing``.
    :param failure_limit: consecutive failed polls before the wait ends as ``error``...
    :param failure_patience: ...and for at least this many seconds (see :func:`out_of_patience`).
    :param cancel_array_on_failure: cancel the remaining array tasks once one failed.
    :param stream_logs: hand out the job's new log lines while it runs.
    :param tail_lines: lines of log tail a failure brings.
    """

    poll_interval: float = 2.0
    max_poll_interval: float = 60.0
    deadline: float | None = None
    missing_grace: float = 120.0
    failure_limit: int = 6
    failure_patience: float = 600.0
    cancel_array_on_failure: bool = False
    stream_logs: bool = True
    tail_lines: int = 50

    def __post_init__(self) -> None:
        if self.poll_interval <= 0 or self.max_poll_interval < self.poll_interval:
            raise ValueError(f"need 0 < poll_interval <= max_poll_interval, got {self.poll_interval}, "
                             f"{self.max_poll_interval}")
        if self.failure_limit < 1 or self.tail_lines < 0 or self.missing_grace < 0 or self.failure_patience < 0:
            raise ValueError("failure_limit must be >= 1, tail_lines, missing_grace and failure_patience >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> WaitSettings:
        """Build from a mapping, ignoring keys that are not settings."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass(frozen=True)
class WaitEvent:
    """How a wait ended: the one event a trigger fires, validated where it is read back.

    :param status: ``success`` / ``failed`` (the job ended; ``snapshot`` says how), ``timeout``
        (the deadline passed), ``missing`` (Slurm forgot the job), ``error`` (polling failed for good).
    :param log_tail: the end of the failed job's log.
    :param log_offsets: bytes of each log delivered so far.
    """

    status: WaitStatus
    job_id: str
    message: str
    snapshot: JobSnapshot | None = None
    log_tail: str = ""
    log_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def job_ended(self) -> bool:
        return self.status in ("success", "failed")

    def to_payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "job_id": self.job_id,
            "message": self.message,
            "snapshot": self.snapshot.to_dict() if self.snapshot else None,
            "log_tail": self.log_tail,
            "log_offsets": dict(self.log_offsets),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> WaitEvent:
        """Read an event back (from the trigger, through the database).

        :raises ValueError: not an event of this engine, or one whose job ended without a snapshot.
        """
        status = payload.get("status") if isinstance(payload, Mapping) else None
        if status not in get_args(WaitStatus):
            raise ValueError(f"not a Slurm wait event: {payload!r}")
        snap = payload.get("snapshot")
        if status in ("success", "failed") and not snap:
            raise ValueError(f"a {status!r} Slurm wait event without the job's snapshot: {payload!r}")
        return cls(
            status=status,
            job_id=str(payload.get("job_id", "")),
            message=str(payload.get("message", "")),
            snapshot=JobSnapshot.from_dict(snap) if snap else None,
            log_tail=str(payload.get("log_tail") or ""),
            log_offsets={str(k): int(v) for k, v in (payload.get("log_offsets") or {}).items()},
        )


@dataclass
class Step:
    """What the driver should do after one observation.

    :param messages: state changes worth a line in the task log.
    :param cancel_rest: scancel the job now (the remaining tasks of a failed array).
    :param event: the wait is over; when ``tail_path`` is set, read that file's end and pass it
        through :meth:`WaitEngine.with_tail` first.
    """

    messages: list[str] = field(default_factory=list)
    cancel_rest: bool = False
    event: WaitEvent | None = None
    tail_path: str | None = None


def state_changed(before: JobSnapshot | None, after: JobSnapshot) -> bool:
    """A change worth polling fast again for: state, restarts, or any array task's state."""
    if before is None:
        return True
    if before.state.state != after.state.state or before.state.restarts != after.state.restarts:
        return True
    return {t: s.state for t, s in before.tasks.items()} != {t: s.state for t, s in after.tasks.items()}


#: Growth of the poll interval per quiet round. After t quiet seconds the interval is about
#: (BACKOFF - 1) * t + the fastest interval, and a job's end is seen half an interval late on
#: average: 1.25 made a 10 s job's end ~2 s late where 1.5 made it 3-4 s, for a few more rounds
#: before the slowest interval (one shared query each, whatever the number of jobs).
BACKOFF = 1.25


def next_interval(current: float | None, low: float, high: float, *, changed: bool, failures: int = 0) -> float:
    """The next poll interval (before jitter): see the module docstring."""
    if failures:
        return min(low * 2 ** min(failures, 10), high)
    if changed or current is None:
        return low
    return min(current * BACKOFF, high)


@dataclass
class LogFollower:
    """Which log bytes to read next: of running jobs/tasks, and once more of those that just ended.

    Owned by whoever reads (the shared poller for a trigger, the waiter itself otherwise); it
    advances on every chunk read, so a read never repeats even before its lines are delivered.
    """

    paths: JobPaths
    offsets: dict[str, int] = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    previous: JobSnapshot | None = None
    #: the snapshot of planned reads not read yet: it becomes ``previous`` once one is read, so
    #: a failed read of a job that just ended is planned again (its lines were lost otherwise)
    _pending: JobSnapshot | None = field(default=None, repr=False)

    def plan(self, snap: JobSnapshot) -> list[tuple[str, LogRead]]:
        """``(label, read)`` pairs for this snapshot; label is ``""`` or ``"task N"``."""
        units: list[tuple[str, int | None, JobState, JobState | None]]
        if snap.tasks:
            before = self.previous.tasks if self.previous else {}
            units = [(f"task {t}", t, s, before.get(t)) for t, s in snap.tasks.items()]
        else:
            units = [("", None, snap.state, self.previous.state if self.previous else None)]
        reads = []
        for label, task, state, was in units:
            ended_now = state.is_terminal and (was is None or not was.is_terminal)
            if not (state.state.is_active or ended_now):
                continue
            path = self.paths.log(snap.job_id, task, job_name=snap.name)
            if path is not None:
                reads.append((label, LogRead(path, self.offsets.get(path, 0), self.chunk_bytes)))
        if reads:
            self._pending = snap
        else:
            self.previous = snap
        return reads

    def advance(self, chunk: LogChunk) -> None:
        self.offsets[chunk.path] = chunk.next_offset
        if self._pending is not None:
            self.previous, self._pending = self._pending, None


@dataclass
class WaitEngine:
    """The state of one wait, advanced by :meth:`observe`, :meth:`lines` and :meth:`poll_failed`.

    Times are UNIX seconds (``now`` comes from the driver), so the state survives a restart
    (:meth:`state` / :meth:`restore`).

    :param job_id: the job (or array job) id.
    :param paths: the job's files (``None``: no logs, no tail).
    :param offsets: bytes of each log already delivered (where to resume after a restart).
    """

    job_id: str
    settings: WaitSettings = field(default_factory=WaitSettings)
    paths: JobPaths | None = None
    offsets: dict[str, int] = field(default_factory=dict)
    last: JobSnapshot | None = None
    missing_since: float | None = None
    cancelled_rest: bool = False
    failures: int = 0
    failing_since: float | None = None
    last_text: str = ""
    delivered: dict[str, int] = field(default_factory=dict)
    _carry: dict[str, bytes] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.delivered = {**self.offsets, **self.delivered}

    def follower(self) -> LogFollower | None:
        """A log follower starting where delivery stopped (``None`` when logs are not streamed)."""
        if self.paths is None or not self.settings.stream_logs:
            return None
        return LogFollower(self.paths, dict(self.delivered))

    # --- log lines ----------------------------------------------------------------------------

    def lines(self, label: str, chunk: LogChunk, *, final: bool = False) -> list[str]:
        """The whole lines of a chunk, prefixed ``[slurm <id> task N]``; an unfinished last line
        waits for the next chunk (or is handed out when ``final``: the job is over)."""
        prefix = f"[slurm {self.job_id}{' ' + label if label else ''}]"
        out = []
        if chunk.truncated:
            out.append(f"[slurm {self.job_id}] log {chunk.path} was rewritten; showing it from the start")
            self._carry.pop(chunk.path, None)
        lines, rest = complete_lines(chunk.data, self._carry.get(chunk.path, b""))
        if final and rest:
            lines.append(rest.decode("utf-8", "replace"))
            rest = b""
        self._carry[chunk.path] = rest
        self.delivered[chunk.path] = chunk.next_offset - len(rest)
        out += [f"{prefix} {line}" for line in lines]
        return out

    def flush(self) -> list[str]:
        """Unfinished last lines, once the job is over."""
        out = []
        for path, rest in self._carry.items():
            if rest:
                out.append(f"[slurm {self.job_id}] {rest.decode('utf-8', 'replace')}")
                self.delivered[path] = self.delivered.get(path, 0) + len(rest)
        self._carry.clear()
        return out

    # --- decisions ----------------------------------------------------------------------------

    def observe(self, snap: JobSnapshot, now: float) -> Step:
        """Decide after a successful poll."""
        step = Step()
        self.failures, self.failing_since = 0, None
        self.last = snap
        text = describe(snap)
        if text != self.last_text:
            step.messages.append(f"Slurm job {self.job_id}: {text}")
            self.last_text = text

        if snap.state.state is SlurmState.UNKNOWN:
            self.missing_since = self.missing_since if self.missing_since is not None else now
            if now - self.missing_since >= self.settings.missing_grace:
                step.event = self._event(
                    "missing",
                    f"Slurm job {self.job_id} not found by squeue, sacct or scontrol for "
                    f"{self.settings.missing_grace:.0f}s (wrong id, another cluster, or purged from accounting)",
                    snap,
                )
            else:
                step.event = self._deadline_event(now)
            return step
        self.missing_since = None

        progress = snap.progress
        if (self.settings.cancel_array_on_failure and progress and progress.failed_tasks
                and not snap.state.is_terminal and not self.cancelled_rest):
            step.messages.append(f"Array task(s) {', '.join(map(str, progress.failed_tasks))} of job "
                                 f"{self.job_id} failed: cancelling the remaining tasks")
            step.cancel_rest = self.cancelled_rest = True

        if snap.state.is_successful:
            step.event = self._event("success", f"Slurm job {self.job_id} COMPLETED", snap)
        elif snap.state.is_terminal:
            step.event = self._event("failed", f"Slurm job {self.job_id} ended {snap.state}", snap)
            step.tail_path = self.tail_path(snap)
        else:
            step.event = self._deadline_event(now)
        return step

    def poll_failed(self, error: str, now: float) -> Step:
        """Decide after a failed poll (the blocking waiter; the shared poller counts its own)."""
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if out_of_patience(self.failures, now - self.failing_since, self.settings.failure_limit,
                           self.settings.failure_patience):
            return Step(event=self._event("error", error, self.last))
        step = Step(messages=[f"Slurm poll failed ({self.failures}/{self.settings.failure_limit}): {error}"])
        step.event = self._deadline_event(now)
        return step

    def gave_up(self, error: str) -> WaitEvent:
        """The poller gave up (its own failure count ran out) or the driver crashed."""
        return self._event("error", error, self.last)

    def timed_out(self) -> WaitEvent:
        return self._event("timeout", f"Slurm job {self.job_id} still not finished at the deadline", self.last)

    def seconds_left(self, now: float) -> float | None:
        """Until the deadline (``None``: no deadline)."""
        return None if self.settings.deadline is None else max(self.settings.deadline - now, 0.0)

    def tail_path(self, snap: JobSnapshot) -> str | None:
        """The log that explains a failure: of the first failed array task, else of the job."""
        if self.paths is None:
            return None
        return self.paths.log(self.job_id, snap.first_failed_task, job_name=snap.name)

    def with_tail(self, event: WaitEvent, data: bytes | str) -> WaitEvent:
        """The event with the last ``tail_lines`` lines of the tail read (or a note why none)."""
        tail = data if isinstance(data, str) else tail_lines(data, self.settings.tail_lines)
        return WaitEvent(event.status, event.job_id, event.message, event.snapshot, tail, event.log_offsets)

    # --- persistence (the sensor keeps this between reschedules) -----------------------------

    def state(self) -> dict[str, Any]:
        return {"missing_since": self.missing_since, "cancelled_rest": self.cancelled_rest,
                "last_text": self.last_text}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.missing_since = state.get("missing_since")
        self.cancelled_rest = bool(state.get("cancelled_rest"))
        self.last_text = str(state.get("last_text") or "")

    def _deadline_event(self, now: float) -> WaitEvent | None:
        left = self.seconds_left(now)
        return self.timed_out() if left is not None and left <= 0 else None

    def _event(self, status: WaitStatus, message: str, snap: JobSnapshot | None) -> WaitEvent:
        return WaitEvent(status, self.job_id, message, snap, "", dict(self.delivered))


def describe(snap: JobSnapshot) -> str:
    """A snapshot in one line: ``RUNNING restarts=1 [2 COMPLETED, 1 RUNNING]``."""
    return f"{snap.state} [{snap.progress}]" if snap.progress else str(snap.state)
