"""One poller per cluster per triggerer: every waiting job shares one status query per interval.

Triggers do not poll Slurm themselves. They :meth:`ClusterPoller.subscribe` to the poller of
their connection id (module-level registry, per event loop: the triggerer runs all triggers
on one loop), which every interval runs *one* ``squeue`` for all subscribed jobs (plus one
``sacct`` in rounds where some finished) and one batched log read, over one reused SSH
connection, and hands each subscription its :class:`PollUpdate`.

The interval follows :func:`slurmflow.wait.next_interval` (2 s -> 60 s while nothing changes,
back to the minimum on any state change), with jitter so that many triggerers do not poll in
lockstep. After ``failure_limit`` consecutive failed rounds spanning ``failure_patience``
seconds (unreachable host, Slurm errors, unreadable output; :func:`slurmflow.wait.out_of_patience`)
every subscriber gets an error update naming the cause, so no trigger waits forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slurmflow.errors import SlurmError, SSHReauthRequired
from slurmflow.logs import LogChunk, LogRead
from slurmflow.parsing import SlurmParseError
from slurmflow.status import JobSnapshot, ResolveOptions
from slurmflow.versions import UnsupportedSlurmVersion
from slurmflow.wait import LogFollower, next_interval, out_of_patience, state_changed

log = logging.getLogger(__name__)

#: Pause after a wake-up (a new subscriber) so that a burst of deferrals shares one round.
COALESCE_SECONDS = 0.3
#: How long an idle poller keeps its SSH connection for the next deferral.
LINGER_SECONDS = 30.0


@dataclass
class PollUpdate:
    """What one poll round found for one subscription.

    :param snapshot: the job's state (``None`` with an error).
    :param chunks: new log bytes, as ``(label, chunk)``; label is ``""`` or ``"task N"``.
    :param error: set when the poller gave up (the trigger should end with an error event).
    :param warning: a transient problem (the poller keeps trying).
    """

    snapshot: JobSnapshot | None = None
    chunks: list[tuple[str, LogChunk]] = field(default_factory=list)
    error: str | None = None
    warning: str | None = None
    round: int = 0


@dataclass(eq=False)
class Subscription:
    """A trigger's interest in one job.

    :param job_id: the job (or array) id.
    :param logs: which log bytes to read each round (``None``: no log streaming); the poller
        advances it as it reads, so no byte is read twice.
    :param expected_tasks: array size, so vanished finished tasks are looked up in sacct.
    """

    job_id: str
    logs: LogFollower | None = None
    expected_tasks: int | None = None
    min_interval: float = 2.0
    max_interval: float = 60.0
    failure_limit: int = 6
    failure_patience: float = 600.0
    queue: asyncio.Queue[PollUpdate] = field(default_factory=asyncio.Queue)
    last: JobSnapshot | None = None

    async def next_update(self) -> PollUpdate:
        return await self.queue.get()

    def log_reads(self, snap: JobSnapshot) -> list[tuple[str, LogRead]]:
        return self.logs.plan(snap) if self.logs else []


class ClusterPoller:
    """Polls one cluster for all subscribed jobs (see the module docstring).

    :param conn_id: the Slurm (SSH) connection id.
    :param hook_factory: builds the :class:`~slurmflow.hooks.slurm.SlurmAsyncHook` (a seam for tests).
    :param failure_limit: consecutive failed rounds before subscribers get an error.
    :param linger: seconds the poller keeps its connection after the last subscriber left.
    """

    def __init__(
        self,
        conn_id: str,
        hook_factory: Callable[[str], Any] | None = None,
        *,
        failure_limit: int = 6,
        jitter: float = 0.2,
        linger: float | None = None,
        coalesce: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self._hook_factory = hook_factory or _default_hook
        self.hook = self._hook_factory(conn_id)
        self.failure_limit = failure_limit
        self.jitter = jitter
        self.linger = LINGER_SECONDS if linger is None else linger
        self.coalesce = COALESCE_SECONDS if coalesce is None else coalesce
        self.subscriptions: set[Subscription] = set()
        self.resolve_options = ResolveOptions()
        self.interval: float | None = None
        self.rounds = 0
        self.failures = 0
        self.failing_since: float | None = None
        #: Slurm commands per round, newest last (what the tests and the benchmark read).
        self.round_queries: list[Counter[str]] = []
        self._waiter: asyncio.Future[bool] | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    # Subscriptions are compared by identity: two triggers may follow the same job.
    def subscribe(self, sub: Subscription) -> Subscription:
        self.subscriptions.add(sub)
        self.interval = None  # a new job: poll at the fastest pace again
        self._wake_up()
        self._ensure_running()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
        if not self.subscriptions:
            self._wake_up()

    async def cancel(self, job_ids: list[str]) -> None:
        """scancel over the shared connection (a trigger's on_kill, or cancel-on-failure)."""
        await self.hook.cancel(job_ids)

    async def remove(self, paths: list[str]) -> None:
        """Delete files over the shared connection (``rm -f``; a missing file is no error)."""
        result = await self.hook.run(["rm", "-f", "--", *paths])
        if result.exit_code != 0:
            raise SlurmError(f"rm {' '.join(paths)}: {result.stderr.strip() or result.exit_code}")

    async def read_tail(self, path: str, nbytes: int) -> bytes:
        chunks = await self.hook.read_logs([LogRead(path, -1, nbytes)])
        return chunks[0].data if chunks else b""

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            # A fresh context: the task must not inherit the subscribing trigger's log context
            # (the triggerer routes log records by context variables to that trigger's task log).
            self._task = loop.create_task(self._run(), name=f"slurmflow-poller-{self.conn_id}",
                                          context=contextvars.Context())

    def _bounds(self) -> tuple[float, float]:
        subs = list(self.subscriptions)
        if not subs:
            return 2.0, 60.0
        low = min(s.min_interval for s in subs)
        high = max(low, min(s.max_interval for s in subs))
        return low, high

    async def _run(self) -> None:
        try:
            await self._sleep(self.coalesce)
            while True:
                if not self.subscriptions:
                    if not await self._linger():
                        return
                    continue
                changed = await self._round()
                low, high = self._bounds()
                base = next_interval(self.interval, low, high, changed=changed, failures=self.failures)
                self.interval = base
                delay = base * random.uniform(1 - self.jitter, 1 + self.jitter)
                await self._sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - a bug; subscribers must still hear about it
            log.exception("Slurm poller for %s crashed", self.conn_id)
            self._broadcast_error(f"Slurm poller for {self.conn_id} crashed; see the triggerer log")
        finally:
            if not self.subscriptions:
                await self._close()

    async def _sleep(self, delay: float) -> None:
        """Sleep, but wake early (after a short coalescing pause) when a job subscribes.

        A bare future and ``call_later`` rather than ``asyncio.wait_for(event.wait())``: on
        Python < 3.12 ``wait_for`` swallows a cancellation that arrives as the event fires,
        which would keep the poller alive through a triggerer shutdown.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(max(delay, 0.0), _resolve, waiter, False)
        try:
            woken = await waiter
        finally:
            handle.cancel()
            self._waiter = None
        if woken:
            await asyncio.sleep(self.coalesce)

    def _wake_up(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, True)

    async def _linger(self) -> bool:
        """Keep the connection for a while for the next deferral; ``False`` when done."""
        deadline = time.monotonic() + self.linger
        while not self.subscriptions:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _forget(self)
                return False
            await self._sleep(remaining)
        return True

    async def _round(self) -> bool:
        """One poll: states for all jobs, then the logs that matter. ``True`` if anything changed."""
        subs = list(self.subscriptions)
        job_ids = sorted({s.job_id for s in subs}, key=int)
        self.resolve_options.expected_tasks = {
            s.job_id: s.expected_tasks for s in subs if s.expected_tasks
        }
        before = Counter(self.hook.command_counts)
        self.rounds += 1
        try:
            snapshots = await self.hook.get_states(job_ids, self.resolve_options)
            plans = {id(s): s.log_reads(snapshots[s.job_id]) for s in subs}
            reads = [r for plan in plans.values() for _, r in plan]
            chunks = await self.hook.read_logs(reads) if reads else []
        except (UnsupportedSlurmVersion, SSHReauthRequired) as exc:
            # No later round can do better (an old Slurm; an SSH master or certificate only a
            # person can renew): every subscriber hears it now, not after failure_limit.
            self._record_round(before)
            log.error("Slurm poll on %r: %s", self.conn_id, exc)
            self._broadcast_error(str(exc))
            return False
        except (SlurmError, SlurmParseError, ValueError, OSError) as exc:
            self.failures += 1
            now = time.monotonic()
            self.failing_since = self.failing_since if self.failing_since is not None else now
            self._record_round(before)
            limit = min([s.failure_limit for s in subs] or [self.failure_limit])
            patience = min([s.failure_patience for s in subs] or [0.0])
            message = (f"Slurm poll on {self.conn_id!r} failed ({self.failures}/{limit}, failing for "
                       f"{now - self.failing_since:.0f}/{patience:.0f} s): {exc}")
            log.warning("%s", message)
            if out_of_patience(self.failures, now - self.failing_since, limit, patience):
                self._broadcast_error(message)
                self.failures, self.failing_since = 0, None
            else:
                for sub in subs:
                    sub.queue.put_nowait(PollUpdate(warning=message, round=self.rounds))
            return False
        self.failures, self.failing_since = 0, None
        self._record_round(before)
        changed = False
        by_read = iter(chunks)
        for sub in subs:
            snap = snapshots[sub.job_id]
            changed = changed or state_changed(sub.last, snap)
            got: list[tuple[str, LogChunk]] = []
            for label, _read in plans[id(sub)]:
                chunk = next(by_read)
                sub.logs.advance(chunk)
                got.append((label, chunk))
            sub.last = snap
            sub.queue.put_nowait(PollUpdate(snapshot=snap, chunks=got, round=self.rounds))
        return changed

    def _record_round(self, before: Counter[str]) -> None:
        after = Counter(self.hook.command_counts)
        after.subtract(before)
        self.round_queries.append(+after)
        del self.round_queries[:-1000]

    def _broadcast_error(self, message: str) -> None:
        for sub in list(self.subscriptions):
            sub.queue.put_nowait(PollUpdate(error=message, round=self.rounds))

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            _forget(self)
            await self.hook.close()


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _default_hook(conn_id: str) -> Any:
    from slurmflow.hooks.slurm import SlurmAsyncHook

    return SlurmAsyncHook(conn_id)


# One registry per event loop: the triggerer runs every trigger on one loop, while tests
# create a loop per test; a poller must never be shared across loops.
_REGISTRY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ClusterPoller]] = (
    weakref.WeakKeyDictionary()
)


def get_poller(conn_id: str, hook_factory: Callable[[str], Any] | None = None) -> ClusterPoller:
    """The poller of ``conn_id`` in the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    pollers = _REGISTRY.setdefault(loop, {})
    poller = pollers.get(conn_id)
    if poller is None or poller._closed:
        poller = ClusterPoller(conn_id, hook_factory)
        pollers[conn_id] = poller
    return poller


def active_pollers() -> dict[str, ClusterPoller]:
    """Pollers of the running loop, by connection id (for tests and diagnostics)."""
    return dict(_REGISTRY.get(asyncio.get_running_loop(), {}))


def _forget(poller: ClusterPoller) -> None:
    for pollers in _REGISTRY.values():
        if pollers.get(poller.conn_id) is poller:
            del pollers[poller.conn_id]
