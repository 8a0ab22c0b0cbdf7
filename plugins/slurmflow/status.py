"""Resolving the states of many jobs with as few Slurm queries as possible.

Pure, "sans-I/O": :func:`resolve_states` is a generator that *yields* the argv of each
command it needs and receives a :class:`CommandResult` back, so the same logic runs over the
blocking hook (:func:`run_sync`) and over the shared asyncio poller (:func:`run_async`).

Per call: one ``squeue`` for all jobs (answered from slurmctld's memory, which holds finished
jobs for ``MinJobAge`` seconds); then, only for jobs that finished or left squeue, one
``sacct`` for all of them (slurmdbd keeps them forever). Without accounting, ``scontrol``
answers for finished jobs still in memory.

Preemption (the rule, see :mod:`slurmflow.states`): the controller's live record always beats
accounting's, so a job that Slurm requeued after a preemption is followed as ``PENDING`` /
``RUNNING`` with its restart count, whatever sacct prints for its earlier runs. Accounting's
``PREEMPTED`` is the job's end only when it survives that fold (the controller no longer lists
the job, or lists it ended): ``PreemptMode=CANCEL``, or a job that could not be requeued.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from slurmflow import commands
from slurmflow.errors import SlurmCommandError
from slurmflow.parsing import (
    JobRecord,
    SlurmParseError,
    group_by_job,
    parse_sacct,
    parse_scontrol_jobs,
    parse_squeue,
)
from slurmflow.states import ArrayProgress, JobState, SlurmState, aggregate_states
from slurmflow.versions import SlurmFeatures

_INVALID_ID = "Invalid job id"
_NO_ACCOUNTING = ("accounting storage is disabled", "AccountingStorageType", "slurmdbd: Connection refused")


@dataclass(frozen=True)
class CommandResult:
    """What a remote command returned."""

    exit_code: int
    stdout: str
    stderr: str = ""


def format_seconds(seconds: int | None) -> str:
    if seconds is None:
        return ""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


@dataclass(frozen=True)
class JobSnapshot:
    """The state of one job (or whole array) at one poll.

    :param job_id: the job id (the array job id for arrays).
    :param state: the aggregated state (restarts = the most any task had).
    :param tasks: per array task, its state; empty for a plain job.
    :param final: facts come from accounting (sacct) or the controller after the end, so
        exit code and elapsed time will not change any more.
    :param source: ``squeue``, ``sacct``, ``scontrol`` or ``none`` (not found anywhere).
    """

    job_id: str
    state: JobState
    tasks: dict[int, JobState] = field(default_factory=dict)
    name: str = ""
    elapsed_seconds: int | None = None
    node_list: str = ""
    start: str = ""
    end: str = ""
    final: bool = False
    source: str = "none"

    @property
    def is_array(self) -> bool:
        return bool(self.tasks)

    @property
    def progress(self) -> ArrayProgress | None:
        if not self.tasks:
            return None
        return ArrayProgress.from_task_states(self.tasks)

    @property
    def first_failed_task(self) -> int | None:
        """The array task whose log explains the failure: the first one that failed by itself,
        else the first one that was cancelled; ``None`` for plain jobs and clean arrays."""
        bad = [t for t, s in self.tasks.items() if s.is_terminal and not s.is_successful]
        own = [t for t in bad if self.tasks[t].state is not SlurmState.CANCELLED]
        return (own or bad or [None])[0]

    def facts(self) -> dict[str, Any]:
        """Plain-typed facts for events and XCom."""
        progress = self.progress
        return {
            "job_id": self.job_id,
            "job_name": self.name,
            **self.state.to_dict(),
            "elapsed_seconds": self.elapsed_seconds,
            "elapsed": format_seconds(self.elapsed_seconds),
            "node_list": self.node_list,
            "start": self.start,
            "end": self.end,
            "source": self.source,
            "array": progress.to_dict() if progress else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.facts(),
            "tasks": {str(t): s.to_dict() for t, s in self.tasks.items()},
            "final": self.final,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSnapshot:
        return cls(
            job_id=str(data["job_id"]),
            state=JobState.from_dict(data),
            tasks={int(t): JobState.from_dict(s) for t, s in (data.get("tasks") or {}).items()},
            name=data.get("job_name", ""),
            elapsed_seconds=data.get("elapsed_seconds"),
            node_list=data.get("node_list", ""),
            start=data.get("start", ""),
            end=data.get("end", ""),
            final=bool(data.get("final")),
            source=data.get("source", "none"),
        )

    @classmethod
    def unknown(cls, job_id: str) -> JobSnapshot:
        return cls(job_id=job_id, state=JobState(SlurmState.UNKNOWN, reason="not found in squeue or sacct"))


def snapshot_from_records(job_id: str, records: Iterable[JobRecord], *, final: bool) -> JobSnapshot:
    """Fold one job's records (one, or one per array task) into a :class:`JobSnapshot`."""
    recs = list(records)
    if not recs:
        return JobSnapshot.unknown(job_id)
    tasks = {r.array_task: r.state for r in recs if r.array_task is not None}
    if not tasks:
        rec = recs[-1]
        return JobSnapshot(
            job_id=job_id,
            state=rec.state,
            name=rec.name,
            elapsed_seconds=rec.elapsed_seconds,
            node_list=rec.node_list,
            start=rec.start,
            end=rec.end,
            final=final and rec.state.is_terminal,
            source=rec.source,
        )
    agg = aggregate_states(tasks.values())
    done = all(s.is_terminal for s in tasks.values())
    # The array's exit code: the worst task's (the first failing one), else 0 when all completed.
    failing = [r for r in recs if r.state.state is agg and r.array_task is not None]
    exemplar = failing[0] if failing else recs[0]
    nodes = sorted({r.node_list for r in recs if r.node_list})
    elapsed = [r.elapsed_seconds for r in recs if r.elapsed_seconds is not None]
    return JobSnapshot(
        job_id=job_id,
        state=JobState(
            state=agg,
            reason=exemplar.state.reason,
            exit_code=exemplar.state.exit_code if done else None,
            signal=exemplar.state.signal if done else None,
            restarts=max(s.restarts for s in tasks.values()),
            ended=done and agg is SlurmState.PREEMPTED,
        ),
        tasks=dict(sorted(tasks.items())),
        name=recs[0].name,
        elapsed_seconds=max(elapsed) if elapsed else None,
        node_list=",".join(nodes),
        start=min((r.start for r in recs if r.start), default=""),
        end=max((r.end for r in recs if r.end), default=""),
        final=final and done,
        source=recs[0].source,
    )


@dataclass
class ResolveOptions:
    """Knobs of a resolution.

    :param accounting: ask sacct for finished jobs; set to ``False`` once sacct reported that
        accounting is disabled (then scontrol answers while the controller remembers the job).
    :param expected_tasks: array size per job id, so an array whose finished tasks already
        left squeue is looked up in sacct too.
    :param features: the login node's Slurm release (:mod:`slurmflow.versions`); ``None``: unknown.
    """

    accounting: bool = True
    expected_tasks: Mapping[str, int] = field(default_factory=dict)
    features: SlurmFeatures | None = None


Resolution = Generator[list[str], CommandResult, dict[str, JobSnapshot]]


def resolve_states(job_ids: Iterable[str], options: ResolveOptions | None = None) -> Resolution:
    """Yield the commands needed to learn every job's state; return ``{job_id: JobSnapshot}``.

    Jobs unknown to every source come back as ``UNKNOWN`` (the caller decides how long to
    wait before calling that an error). ``options.accounting`` is switched off in place when
    sacct says accounting is disabled.

    :raises SlurmCommandError: a command failed for another reason (controller down...).
    :raises SlurmParseError: a command printed something unreadable.
    """
    opts = options or ResolveOptions()
    ids = sorted({str(j) for j in job_ids}, key=int)
    if not ids:
        return {}
    result = yield commands.squeue_jobs(ids)
    if result.exit_code != 0:
        # squeue fails with "Invalid job id specified" when *none* of the ids is in memory.
        if _INVALID_ID not in result.stderr:
            raise SlurmCommandError("squeue", result.exit_code, result.stderr or result.stdout)
        live: dict[str, list[JobRecord]] = {}
    else:
        live = group_by_job(parse_squeue(result.stdout, opts.features))

    snapshots: dict[str, JobSnapshot] = {}
    need_final: list[str] = []
    for job_id in ids:
        recs = live.get(job_id)
        if recs:
            snap = snapshot_from_records(job_id, recs, final=False)
            snapshots[job_id] = snap
            expected = opts.expected_tasks.get(job_id)
            tasks_missing = bool(expected) and len(snap.tasks) < int(expected or 0)
            if snap.state.is_terminal or (tasks_missing and snap.tasks):
                need_final.append(job_id)
        else:
            need_final.append(job_id)

    if not need_final:
        return snapshots

    if opts.accounting:
        result = yield commands.sacct_jobs(need_final)
        if result.exit_code != 0 and any(m in result.stderr for m in _NO_ACCOUNTING):
            opts.accounting = False
        elif result.exit_code != 0:
            raise SlurmCommandError("sacct", result.exit_code, result.stderr or result.stdout)
        else:
            accounted = group_by_job(parse_sacct(result.stdout))
            for job_id in need_final:
                recs = accounted.get(job_id)
                if not recs:
                    continue
                merged = _merge(live.get(job_id, []), recs)
                snapshots[job_id] = snapshot_from_records(job_id, merged, final=True)

    if not opts.accounting:
        for job_id in need_final:
            if job_id in snapshots and not snapshots[job_id].state.is_terminal:
                continue
            result = yield commands.scontrol_show_job(job_id)
            if result.exit_code != 0:
                if _INVALID_ID in result.stderr:
                    continue
                raise SlurmCommandError("scontrol", result.exit_code, result.stderr or result.stdout)
            recs = parse_scontrol_jobs(result.stdout)
            if recs:
                snapshots[job_id] = snapshot_from_records(job_id, recs, final=True)

    for job_id in ids:
        snap = snapshots.get(job_id)
        if snap is None:
            snapshots[job_id] = JobSnapshot.unknown(job_id)
        elif snap.state.is_terminal and not snap.final:
            # Finished per squeue and no accounting record yet: squeue's facts are the end state.
            snapshots[job_id] = _as_final(snap)
    return snapshots


def _merge(live: list[JobRecord], accounted: list[JobRecord]) -> list[JobRecord]:
    """Per job or task: accounting's record (richer facts), unless the controller still sees
    it live, accounting has not caught up with its end yet (slurmdbd lags slurmctld), or
    accounting only has the array's folded line for it: right after an ``scancel`` of an array,
    sacct prints ``123_[0-5%2] CANCELLED`` for every task, also for one that had FAILED on its
    own, whose exit code the controller still shows.

    An accounting record that is left after this is the job's last word: a ``PREEMPTED`` one
    is the end (the controller would list a requeued job as live), see the module docstring."""
    by_id = {r.job_id: r for r in accounted}
    for rec in live:
        acc = by_id.get(rec.job_id)
        if acc is None or acc.ranged or not rec.state.is_terminal or not acc.state.as_ended().is_terminal:
            by_id[rec.job_id] = rec
    return [r if r.source != "sacct" else replace(r, state=r.state.as_ended()) for r in by_id.values()]


def _as_final(snap: JobSnapshot) -> JobSnapshot:
    return replace(snap, final=True)


def lookup_key(
    names: list[str], *, since: str = "now-30days", accounting: bool = True, features: SlurmFeatures | None = None
) -> Generator[list[str], CommandResult, dict[str, JobSnapshot]]:
    """Yield the commands finding every job with one of ``names``; return snapshots by job id.

    squeue answers for jobs in the controller's memory (live, or finished < MinJobAge ago),
    sacct for everything since ``since``. A job in both keeps the controller's view while live.

    :raises SlurmCommandError: a command failed (controller or slurmdbd unreachable...).
    """
    result = yield commands.squeue_by_name(names)
    if result.exit_code != 0:
        raise SlurmCommandError("squeue", result.exit_code, result.stderr or result.stdout)
    live = group_by_job(parse_squeue(result.stdout, features))
    accounted: dict[str, list[JobRecord]] = {}
    if accounting:
        result = yield commands.sacct_by_name(names, since=since)
        if result.exit_code != 0 and not any(m in result.stderr for m in _NO_ACCOUNTING):
            raise SlurmCommandError("sacct", result.exit_code, result.stderr or result.stdout)
        if result.exit_code == 0:
            accounted = group_by_job(parse_sacct(result.stdout))
    wanted = set(names)
    found: dict[str, JobSnapshot] = {}
    for job_id in sorted(set(live) | set(accounted), key=int):
        recs = _merge(live.get(job_id, []), accounted.get(job_id, []))
        recs = [r for r in recs if r.name in wanted]
        if recs:
            found[job_id] = snapshot_from_records(job_id, recs, final=job_id in accounted)
    return found


def run_sync(gen: Resolution, runner: Callable[[list[str]], CommandResult]) -> dict[str, JobSnapshot]:
    """Drive a resolution with a blocking runner."""
    try:
        argv = next(gen)
        while True:
            argv = gen.send(runner(argv))
    except StopIteration as stop:
        return stop.value


async def run_async(
    gen: Resolution, runner: Callable[[list[str]], Awaitable[CommandResult]]
) -> dict[str, JobSnapshot]:
    """Drive a resolution with an async runner."""
    try:
        argv = next(gen)
        while True:
            argv = gen.send(await runner(argv))
    except StopIteration as stop:
        return stop.value


__all__ = [
    "CommandResult",
    "JobSnapshot",
    "ResolveOptions",
    "SlurmCommandError",
    "SlurmParseError",
    "lookup_key",
    "resolve_states",
    "run_async",
    "run_sync",
    "snapshot_from_records",
]
