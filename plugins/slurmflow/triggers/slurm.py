"""SlurmJobTrigger: waits in the triggerer for a Slurm job, streaming its log into the task log.

Design (Airflow 3.3):

* **Shared polling.** The trigger subscribes to the cluster's :class:`~slurmflow.poller.ClusterPoller`
  (one per connection id in the triggerer), so N waiting jobs cost one ``squeue`` per interval.
* **Live logs.** The poller reads new bytes of the job's ``--output`` file each round; the
  trigger logs them line by line with ``self.log``. In Airflow 3 the triggerer routes records
  logged inside a trigger's coroutine to that task instance's log (the ``.trigger.<id>.log``
  part the UI shows with the task log), so lines appear while the job runs without waking a
  worker. (The poller itself runs in a fresh context so it never logs into one task's log.)
* **One event.** The trigger fires exactly one event, when the job reaches a terminal state,
  the deadline passes, or polling fails for good; errors become ``status: error`` events,
  never exceptions.
* **Cancel means cancel.** Airflow does not call ``BaseOperator.on_kill`` for deferred tasks.
  Airflow 3.3 calls ``BaseTrigger.on_kill`` when a user acts on the deferred task (mark
  failed/success, clear) - but the triggerer uses the same path for a trigger reassigned to
  another triggerer, so :meth:`on_kill` first asks the API server whether the task instance
  is still deferred, and scancels only if it is not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from slurmflow import poller as poller_module
from slurmflow.logs import DEFAULT_CHUNK_BYTES, DEFAULT_TAIL_BYTES, complete_lines, tail_lines
from slurmflow.poller import Subscription, get_poller
from slurmflow.sbatch import expand_log_path
from slurmflow.states import SlurmState
from slurmflow.status import JobSnapshot


class SlurmJobTrigger(BaseTrigger):
    """Wait for a Slurm job (or job array) to finish.

    :param job_id: the job (or array job) id.
    :param slurm_conn_id: SSH connection of the login node.
    :param log_pattern: the job's ``--output`` pattern (absolute; ``%j``/``%A``/``%a`` allowed);
        ``None`` disables log streaming and tails.
    :param job_name: the job name (for ``%x`` in the pattern).
    :param user: the cluster user (for ``%u``).
    :param log_offsets: bytes of each log already shown (path -> offset).
    :param expected_tasks: number of array tasks (arrays only).
    :param poll_interval: fastest poll interval, seconds.
    :param max_poll_interval: slowest poll interval while nothing changes, seconds.
    :param deadline: UNIX time after which the trigger fires a ``timeout`` event.
    :param cancel_on_kill: scancel the job when a user kills the deferred task (False for a
        sensor watching someone else's job).
    :param cancel_array_on_failure: scancel the remaining array tasks once one task failed.
    :param stream_logs: log new output lines while the job runs.
    :param tail_lines: lines of log tail included in a failure event.
    :param missing_grace: seconds a job may be unknown to squeue, sacct and scontrol before
        the trigger reports it as not found.
    :param failure_limit: consecutive failed poll rounds before an error event.
    """

    def __init__(
        self,
        *,
        job_id: str,
        slurm_conn_id: str = "slurm_default",
        log_pattern: str | None = None,
        job_name: str = "",
        user: str = "",
        log_offsets: dict[str, int] | None = None,
        expected_tasks: int | None = None,
        poll_interval: float = 2.0,
        max_poll_interval: float = 60.0,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        cancel_array_on_failure: bool = False,
        stream_logs: bool = True,
        tail_lines: int = 50,
        missing_grace: float = 120.0,
        failure_limit: int = 6,
    ) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.slurm_conn_id = slurm_conn_id
        self.log_pattern = log_pattern
        self.job_name = job_name
        self.user = user
        self.log_offsets = dict(log_offsets or {})
        self.expected_tasks = expected_tasks
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.deadline = deadline
        self.cancel_on_kill = cancel_on_kill
        self.cancel_array_on_failure = cancel_array_on_failure
        self.stream_logs = stream_logs
        self.tail_lines = tail_lines
        self.missing_grace = float(missing_grace)
        self.failure_limit = int(failure_limit)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "slurm_conn_id": self.slurm_conn_id,
                "log_pattern": self.log_pattern,
                "job_name": self.job_name,
                "user": self.user,
                "log_offsets": dict(self.log_offsets),
                "expected_tasks": self.expected_tasks,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
                "cancel_array_on_failure": self.cancel_array_on_failure,
                "stream_logs": self.stream_logs,
                "tail_lines": self.tail_lines,
                "missing_grace": self.missing_grace,
                "failure_limit": self.failure_limit,
            },
        )

    def _event(self, status: str, message: str, snap: JobSnapshot | None = None, tail: str = "") -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "job_id": self.job_id,
                "message": message,
                "snapshot": snap.to_dict() if snap else None,
                "log_tail": tail,
                "log_offsets": dict(self.log_offsets),
            }
        )

    def _log_lines(self, label: str, lines: list[str]) -> None:
        prefix = f"[slurm {self.job_id}{' ' + label if label else ''}]"
        for line in lines:
            self.log.info("%s %s", prefix, line)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            poller = get_poller(self.slurm_conn_id)
            sub = Subscription(
                job_id=self.job_id,
                log_pattern=self.log_pattern if self.stream_logs else None,
                job_name=self.job_name,
                user=self.user,
                offsets=self.log_offsets,
                expected_tasks=self.expected_tasks,
                min_interval=self.poll_interval,
                max_interval=self.max_poll_interval,
                chunk_bytes=DEFAULT_CHUNK_BYTES,
                failure_limit=self.failure_limit,
            )
        except Exception as exc:
            yield self._event("error", f"cannot start polling Slurm job {self.job_id}: {exc}")
            return
        poller.subscribe(sub)
        carry: dict[str, bytes] = {}
        last_text = ""
        missing_since: float | None = None
        cancelled_rest = False
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: wait_for (Python < 3.12) can swallow the
                    # triggerer's cancellation when an update arrives at the same moment.
                    async with asyncio.timeout_at(self._loop_deadline()):
                        update = await sub.next_update()
                except TimeoutError:
                    yield self._event(
                        "timeout", f"Slurm job {self.job_id} still not finished at the deadline", sub.last
                    )
                    return
                if update.error:
                    yield self._event("error", update.error, sub.last)
                    return
                if update.warning:
                    self.log.warning("%s", update.warning)
                    continue
                for label, chunk in update.chunks:
                    if chunk.truncated:
                        self.log.info("[slurm %s] log %s was rewritten; showing it from the start", self.job_id, chunk.path)
                        carry.pop(chunk.path, None)
                    lines, carry[chunk.path] = complete_lines(chunk.data, carry.get(chunk.path, b""))
                    self._log_lines(label, lines)
                snap = update.snapshot
                if snap is None:
                    continue
                text = self._describe(snap)
                if text != last_text:
                    self.log.info("Slurm job %s: %s", self.job_id, text)
                    last_text = text

                if snap.state.state is SlurmState.UNKNOWN:
                    missing_since = missing_since or time.monotonic()
                    if time.monotonic() - missing_since >= self.missing_grace:
                        yield self._event(
                            "error",
                            f"Slurm job {self.job_id} not found by squeue, sacct or scontrol for "
                            f"{self.missing_grace:.0f}s (wrong id, another cluster, or purged from accounting)",
                            snap,
                        )
                        return
                    continue
                missing_since = None

                progress = snap.progress
                if (
                    self.cancel_array_on_failure
                    and progress
                    and progress.failed_tasks
                    and not snap.state.is_terminal
                    and not cancelled_rest
                ):
                    self.log.warning(
                        "Array task(s) %s of job %s failed: cancelling the remaining tasks",
                        ", ".join(map(str, progress.failed_tasks)),
                        self.job_id,
                    )
                    await poller.cancel([self.job_id])
                    cancelled_rest = True

                if snap.state.is_terminal:
                    for rest in carry.values():
                        if rest:
                            self._log_lines("", [rest.decode("utf-8", "replace")])
                    if snap.state.is_successful:
                        yield self._event("success", f"Slurm job {self.job_id} COMPLETED", snap)
                        return
                    tail = await self._tail(poller, snap)
                    yield self._event("failed", f"Slurm job {self.job_id} ended {snap.state}", snap, tail)
                    return
        except Exception as exc:
            # Triggers report problems as events: the task then fails with this message.
            self.log.exception("SlurmJobTrigger for job %s failed", self.job_id)
            yield self._event("error", f"error while waiting for Slurm job {self.job_id}: {exc}", sub.last)
        finally:
            poller.unsubscribe(sub)

    def _loop_deadline(self) -> float | None:
        if self.deadline is None:
            return None
        return asyncio.get_running_loop().time() + max(self.deadline - time.time(), 0.0)

    def _describe(self, snap: JobSnapshot) -> str:
        text = str(snap.state)
        if snap.progress:
            text += f" [{snap.progress}]"
        return text

    async def _tail(self, poller: Any, snap: JobSnapshot) -> str:
        """The end of the log of the failed job (or of the first failed array task)."""
        if not self.log_pattern:
            return ""
        task = snap.first_failed_task
        path = expand_log_path(self.log_pattern, self.job_id, task, user=self.user, job_name=self.job_name)
        if path is None:
            return ""
        try:
            data = await poller.read_tail(path, DEFAULT_TAIL_BYTES)
        except Exception as exc:
            return f"(could not read {path}: {exc})"
        return tail_lines(data, self.tail_lines)

    async def _still_deferred(self) -> bool | None:
        """Whether the task instance is still DEFERRED (``None``: cannot tell)."""
        ti = self.task_instance
        if ti is None:
            return None
        try:
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
            from asgiref.sync import sync_to_async

            states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                dag_id=ti.dag_id,
                task_ids=[ti.task_id],
                run_ids=[ti.run_id],
                map_index=ti.map_index,
            )
        except Exception as exc:
            self.log.warning("Could not read the task instance's state (%s); assuming a user action", exc)
            return None
        key = ti.task_id if (ti.map_index is None or ti.map_index < 0) else f"{ti.task_id}_{ti.map_index}"
        state = (states.get(ti.run_id) or {}).get(key)
        return str(getattr(state, "value", state)) == "deferred"

    async def on_kill(self) -> None:
        """A user marked the deferred task failed/success or cleared it: scancel the job.

        Skipped when the task instance is still deferred (the triggerer moved this trigger, no
        user acted) and for sensors (``cancel_on_kill=False``).
        """
        if not self.cancel_on_kill:
            return
        if await self._still_deferred():
            self.log.info("Task instance still deferred: trigger moved, not cancelling Slurm job %s", self.job_id)
            return
        self.log.warning("Task instance stopped by a user action: cancelling Slurm job %s", self.job_id)
        # A connection of its own: the shared poller may be closing its connection right now
        # (this trigger just unsubscribed, and it may have been the last one).
        hook = poller_module._default_hook(self.slurm_conn_id)
        try:
            await hook.cancel([self.job_id])
        except Exception as exc:
            self.log.error("scancel %s failed: %s", self.job_id, exc)
            raise
        finally:
            await hook.close()
