"""Blocking wait for one job: the operator's ``deferrable=False`` mode.

A worker-held wait cannot share the triggerer's poller, so it polls its one job itself; every
decision (pace, done, missing, cancel the rest, log lines, tail) is the wait engine's
(:mod:`slurmflow.wait`), the same one the trigger and the sensor use.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from slurmflow.errors import SlurmConnectionError, SlurmError
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.logs import DEFAULT_TAIL_BYTES
from slurmflow.parsing import SlurmParseError
from slurmflow.paths import JobPaths
from slurmflow.wait import LogFollower, WaitEngine, WaitEvent, WaitSettings, next_interval, state_changed


@dataclass
class BlockingWaiter:
    """Polls one job until the wait engine says the wait is over.

    :param hook: the Slurm hook.
    :param job_id: the job (array) id.
    :param log: where job lines and state changes go (the task's logger).
    :param paths: the job's files (``None``: no logs, no tail).
    """

    hook: SlurmHook
    job_id: str
    log: logging.Logger | logging.LoggerAdapter
    settings: WaitSettings = field(default_factory=WaitSettings)
    paths: JobPaths | None = None
    expected_tasks: int | None = None
    engine: WaitEngine = field(init=False)
    follower: LogFollower | None = field(init=False)

    def __post_init__(self) -> None:
        self.engine = WaitEngine(self.job_id, self.settings, self.paths)
        self.follower = self.engine.follower()

    def wait(self) -> WaitEvent:
        """Poll until the job ends, the deadline passes, Slurm forgets the job or polling fails
        ``failure_limit`` times in a row; the event says which."""
        engine, interval = self.engine, None
        expected = {self.job_id: self.expected_tasks} if self.expected_tasks else None
        while True:
            before = engine.last
            try:
                snap = self.hook.get_states([self.job_id], expected)[self.job_id]
                reads = self.follower.plan(snap) if self.follower else []
                chunks = self.hook.read_logs([r for _, r in reads]) if reads else []
            except (SlurmError, SlurmParseError, ValueError) as exc:
                if isinstance(exc, SlurmConnectionError):
                    self.hook.close()
                step = engine.poll_failed(str(exc), time.time())
                changed = False
            else:
                for (label, _), chunk in zip(reads, chunks, strict=True):
                    self.follower.advance(chunk)
                    self._emit(engine.lines(label, chunk, final=snap.state.is_terminal))
                step = engine.observe(snap, time.time())
                changed = state_changed(before, snap)
            level = logging.WARNING if step.cancel_rest or engine.failures else logging.INFO
            for message in step.messages:
                self.log.log(level, "%s", message)
            if step.cancel_rest:
                self.hook.cancel([self.job_id])
            if step.event is not None:
                self._emit(engine.flush())
                if step.tail_path:
                    return engine.with_tail(step.event, self._tail(step.tail_path))
                return step.event
            interval = next_interval(interval, self.settings.poll_interval, self.settings.max_poll_interval,
                                     changed=changed, failures=engine.failures)
            self._sleep(interval * random.uniform(0.8, 1.2))

    def _emit(self, lines: list[str]) -> None:
        for line in lines:
            self.log.info("%s", line)

    def _sleep(self, seconds: float) -> None:
        left = self.engine.seconds_left(time.time())
        time.sleep(seconds if left is None else min(seconds, left))

    def _tail(self, path: str) -> bytes | str:
        try:
            return self.hook.tail(path, DEFAULT_TAIL_BYTES)
        except SlurmError as exc:
            return f"(could not read {path}: {exc})"
