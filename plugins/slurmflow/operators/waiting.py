"""Blocking wait for one job (the operator's ``deferrable=False`` mode and the sensor's pokes).

A worker-held wait cannot share a poller with other tasks, so it polls its one job with the
same backoff (2 s -> 60 s with jitter, reset on change) and the same status logic
(:mod:`slurmflow.status`) as the triggerer's shared poller.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from slurmflow.errors import SlurmConnectionError, SlurmError, SlurmJobNotFoundError
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.logs import DEFAULT_TAIL_BYTES, complete_lines, tail_lines
from slurmflow.poller import plan_log_reads, state_changed
from slurmflow.sbatch import expand_log_path
from slurmflow.states import SlurmState
from slurmflow.status import JobSnapshot


@dataclass
class BlockingWaiter:
    """Polls one job until it ends, logging its output.

    :param hook: the Slurm hook.
    :param job_id: the job (array) id.
    :param log: where job lines and state changes go (the task's logger).
    :param log_pattern: ``--output`` pattern; ``None`` disables streaming.
    """

    hook: SlurmHook
    job_id: str
    log: logging.Logger | logging.LoggerAdapter
    log_pattern: str | None = None
    job_name: str = ""
    user: str = ""
    expected_tasks: int | None = None
    poll_interval: float = 2.0
    max_poll_interval: float = 60.0
    deadline: float | None = None
    cancel_array_on_failure: bool = False
    missing_grace: float = 120.0
    failure_limit: int = 6
    tail_line_count: int = 50
    offsets: dict[str, int] = field(default_factory=dict)
    last: JobSnapshot | None = None
    carry: dict[str, bytes] = field(default_factory=dict)

    def poll_once(self) -> JobSnapshot:
        """One round: state, then new log lines."""
        expected = {self.job_id: self.expected_tasks} if self.expected_tasks else None
        snap = self.hook.get_states([self.job_id], expected)[self.job_id]
        reads = plan_log_reads(
            self.log_pattern, snap, self.last, self.offsets, user=self.user, job_name=self.job_name
        )
        if reads:
            for (label, _), chunk in zip(reads, self.hook.read_logs([r for _, r in reads]), strict=True):
                self.offsets[chunk.path] = chunk.next_offset
                lines, self.carry[chunk.path] = complete_lines(chunk.data, self.carry.get(chunk.path, b""))
                if snap.state.is_terminal and self.carry[chunk.path]:
                    lines.append(self.carry.pop(chunk.path).decode("utf-8", "replace"))
                for line in lines:
                    self.log.info("[slurm %s%s] %s", self.job_id, f" {label}" if label else "", line)
        if self.last is None or str(self.last.state) != str(snap.state):
            self.log.info("Slurm job %s: %s%s", self.job_id, snap.state, f" [{snap.progress}]" if snap.progress else "")
        return snap

    def wait(self) -> JobSnapshot:
        """Poll until the job is terminal.

        :raises TimeoutError: the deadline passed.
        :raises SlurmJobNotFoundError: the job stayed unknown for ``missing_grace`` seconds.
        :raises SlurmError: polling failed ``failure_limit`` times in a row.
        """
        interval = self.poll_interval
        failures = 0
        missing_since: float | None = None
        cancelled_rest = False
        while True:
            try:
                snap = self.poll_once()
                failures = 0
            except (SlurmError, ValueError) as exc:
                failures += 1
                if failures >= self.failure_limit:
                    raise
                self.log.warning("Slurm poll failed (%d/%d): %s", failures, self.failure_limit, exc)
                if isinstance(exc, SlurmConnectionError):
                    self.hook.close()
                interval = min(self.poll_interval * 2**failures, self.max_poll_interval)
                self._sleep(interval)
                continue
            changed = state_changed(self.last, snap)
            self.last = snap
            if snap.state.state is SlurmState.UNKNOWN:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since >= self.missing_grace:
                    raise SlurmJobNotFoundError(
                        f"Slurm job {self.job_id} not found by squeue, sacct or scontrol for {self.missing_grace:.0f}s"
                    )
            else:
                missing_since = None
            progress = snap.progress
            if self.cancel_array_on_failure and progress and progress.failed_tasks and not snap.state.is_terminal:
                if not cancelled_rest:
                    self.log.warning("Array task(s) %s failed: cancelling the rest", list(progress.failed_tasks))
                    self.hook.cancel([self.job_id])
                    cancelled_rest = True
            if snap.state.is_terminal:
                return snap
            interval = self.poll_interval if changed else min(interval * 1.5, self.max_poll_interval)
            self._sleep(interval * random.uniform(0.8, 1.2))

    def _sleep(self, seconds: float) -> None:
        if self.deadline is not None:
            remaining = self.deadline - time.time()
            if remaining <= 0:
                raise TimeoutError(f"Slurm job {self.job_id} still not finished at the deadline")
            seconds = min(seconds, remaining)
        time.sleep(seconds)

    def tail(self, snap: JobSnapshot) -> str:
        """The end of the failed job's (or first failed array task's) log."""
        if not self.log_pattern:
            return ""
        task = snap.first_failed_task
        path = expand_log_path(self.log_pattern, self.job_id, task, user=self.user, job_name=self.job_name)
        if path is None:
            return ""
        try:
            return tail_lines(self.hook.tail(path, DEFAULT_TAIL_BYTES), self.tail_line_count)
        except SlurmError as exc:
            return f"(could not read {path}: {exc})"
