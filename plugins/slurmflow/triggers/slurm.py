"""SlurmJobTrigger: waits in the triggerer for a Slurm job, streaming its log into the task log.

Design (Airflow 3.3):

* **Shared polling.** The trigger subscribes to the cluster's :class:`~slurmflow.poller.ClusterPoller`
  (one per connection id in the triggerer), so N waiting jobs cost one ``squeue`` per interval.
* **Live logs.** The poller reads new bytes of the job's ``--output`` file each round; the
  trigger logs them line by line with ``self.log``. In Airflow 3 the triggerer routes records
  logged inside a trigger's coroutine to that task instance's log (the ``.trigger.<id>.log``
  part the UI shows with the task log), so lines appear while the job runs without waking a
  worker. (The poller itself runs in a fresh context so it never logs into one task's log.)
* **One rule.** Every decision (done, failed, missing, cancel the rest, which log lines) is the
  wait engine's (:mod:`slurmflow.wait`); the trigger only does its I/O. It fires exactly one
  :class:`~slurmflow.wait.WaitEvent`; errors become ``status: error`` events, never exceptions.
* **Lines once.** After each batch of lines it records the delivered byte offsets in the task
  instance's XCom (``slurm_log_offsets``); a trigger restarted by a new triggerer resumes there,
  so no line shows twice. Until it can read that record (API unreachable) it follows the
  job's state only.
* **Cancel means cancel.** Airflow does not call ``BaseOperator.on_kill`` for deferred tasks.
  Airflow 3.3 calls ``BaseTrigger.on_kill`` when a user acts on the deferred task (mark
  failed/success, clear) - but the triggerer uses the same path for a trigger reassigned to
  another triggerer, so :meth:`on_kill` first asks the API server whether the task instance
  is still deferred on this job, and scancels only when it *knows* it is not. When it cannot
  tell (API unreachable) it leaves the job alone and says so: the DAG's ``reap`` task cancels
  a job whose task is over, so doubt never costs a healthy job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from slurmflow import poller as poller_module
from slurmflow.errors import SlurmError
from slurmflow.identity import XCOM_JOB_KEY, XCOM_LOG_OFFSETS
from slurmflow.logs import DEFAULT_TAIL_BYTES
from slurmflow.paths import JobPaths
from slurmflow.poller import Subscription, get_poller
from slurmflow.secrets import SecretRefs, mask_refs
from slurmflow.wait import WaitEngine, WaitSettings


class SlurmJobTrigger(BaseTrigger):
    """Wait for a Slurm job (or job array) to finish.

    :param job_id: the job (or array job) id.
    :param slurm_conn_id: SSH connection of the login node.
    :param settings: :class:`~slurmflow.wait.WaitSettings` as a dict (intervals, deadline,
        missing grace, failure limit, cancel-the-rest, log streaming, tail lines).
    :param paths: :class:`~slurmflow.paths.JobPaths` as a dict; ``None``: no logs, no tail.
    :param log_offsets: bytes of each log already shown (path -> offset).
    :param expected_tasks: number of array tasks (arrays only).
    :param cancel_on_kill: scancel the job when a user kills the deferred task (False for a
        sensor watching someone else's job).
    :param secret_refs: :class:`~slurmflow.secrets.SecretRefs` as a dict: the connections whose
        values the job holds; masked in the triggerer before any log line is shown (kwargs are
        stored in the database: references only, never values).
    :param finish: end a successful job's task here, without resuming it on a worker:
        ``{"job": <the slurm_job record>, "cleanup": [files to delete]}``. The task's
        ``return_value`` is the result the operator's ``execute_complete`` would return. Any
        other end (failure, timeout, error) resumes the task as usual.

    Keyword arguments of earlier versions (``poll_interval``, ``log_pattern``, ``user``...) are
    still accepted, so triggers serialized before an upgrade resume.
    """

    def __init__(
        self,
        *,
        job_id: str,
        slurm_conn_id: str = "slurm_default",
        settings: dict[str, Any] | None = None,
        paths: dict[str, Any] | None = None,
        log_offsets: dict[str, int] | None = None,
        expected_tasks: int | None = None,
        cancel_on_kill: bool = True,
        secret_refs: dict[str, Any] | None = None,
        finish: dict[str, Any] | None = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.slurm_conn_id = slurm_conn_id
        self.settings = WaitSettings.from_dict({**legacy, **(settings or {})})
        if paths is None and legacy.get("log_pattern"):
            paths = JobPaths.for_log(legacy["log_pattern"], legacy.get("user", ""), legacy.get("job_name", "")).to_dict()
        self.paths = JobPaths.from_dict(paths) if paths else None
        self.log_offsets = dict(log_offsets or {})
        self.expected_tasks = expected_tasks
        self.cancel_on_kill = cancel_on_kill
        self._hold_warned = False
        self._masked = False
        self.secret_refs = SecretRefs.from_dict(secret_refs).to_dict() if secret_refs else None
        self.finish = finish

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "slurm_conn_id": self.slurm_conn_id,
                "settings": self.settings.to_dict(),
                "paths": self.paths.to_dict() if self.paths else None,
                "log_offsets": dict(self.log_offsets),
                "expected_tasks": self.expected_tasks,
                "cancel_on_kill": self.cancel_on_kill,
                "secret_refs": self.secret_refs,
                "finish": self.finish,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        engine = WaitEngine(self.job_id, self.settings, self.paths, offsets=self.log_offsets)
        try:
            poller = get_poller(self.slurm_conn_id)
            sub = Subscription(
                job_id=self.job_id,
                expected_tasks=self.expected_tasks,
                min_interval=self.settings.poll_interval,
                max_interval=self.settings.max_poll_interval,
                failure_limit=self.settings.failure_limit,
                failure_patience=self.settings.failure_patience,
            )
        except Exception as exc:
            yield TriggerEvent(engine.gave_up(f"cannot start polling Slurm job {self.job_id}: {exc}").to_payload())
            return
        streaming = engine.follower() is not None
        if streaming:
            sub.logs = await self._resume_logs(engine)
        poller.subscribe(sub)
        saved = dict(engine.delivered)
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: wait_for (Python < 3.12) can swallow the
                    # triggerer's cancellation when an update arrives at the same moment.
                    async with asyncio.timeout_at(self._loop_deadline(engine)):
                        update = await sub.next_update()
                except TimeoutError:
                    yield TriggerEvent(engine.timed_out().to_payload())
                    return
                if update.error:
                    yield TriggerEvent(engine.gave_up(update.error).to_payload())
                    return
                if update.warning:
                    self.log.warning("%s", update.warning)
                    continue
                snap = update.snapshot
                final = snap is not None and snap.state.is_terminal
                for label, chunk in update.chunks:
                    self._log_lines(engine.lines(label, chunk, final=final))
                if streaming and sub.logs is None:
                    sub.logs = await self._resume_logs(engine)
                if snap is None:
                    continue
                step = engine.observe(snap, time.time())
                for message in step.messages:
                    (self.log.warning if step.cancel_rest else self.log.info)("%s", message)
                if step.cancel_rest:
                    await poller.cancel([self.job_id])
                if step.event is None:
                    if engine.delivered != saved:
                        saved = await self._save_offsets(engine.delivered, saved)
                    continue
                self._log_lines(engine.flush())
                event = step.event
                if self.finish and event.job_ended and event.snapshot.state.is_successful:
                    yield await self._succeed(poller, event)
                    return
                if step.tail_path:
                    event = engine.with_tail(event, await self._tail(poller, step.tail_path))
                yield TriggerEvent(event.to_payload())
                return
        except Exception as exc:
            # Triggers report problems as events: the task then fails with this message.
            self.log.exception("SlurmJobTrigger for job %s failed", self.job_id)
            yield TriggerEvent(engine.gave_up(f"error while waiting for Slurm job {self.job_id}: {exc}").to_payload())
        finally:
            poller.unsubscribe(sub)

    async def _succeed(self, poller: Any, event: Any) -> TriggerEvent:
        """End the task as success from here, doing what ``execute_complete`` would on success:
        its result as ``return_value``, the secrets file deleted. The result goes through the Task
        SDK's XCom API (as the log offsets do): the XComs of a ``TaskSuccessEvent`` are stored
        JSON-encoded twice by Airflow 3.3 and read back as a string. If it cannot be written, the
        task resumes on a worker as without ``finish``."""
        from slurmflow.operators.outcome import completed_message, result_dict

        result = result_dict(event.snapshot, self.finish["job"])
        try:
            if self.task_instance is None:
                raise RuntimeError("no task instance")
            await _in_thread(_set_xcom, self.task_instance, "return_value", result)
        except Exception as exc:
            self.log.warning("Could not record the result of Slurm job %s here (%s): the task resumes "
                             "on a worker", self.job_id, exc)
            return TriggerEvent(event.to_payload())
        cleanup = list(self.finish.get("cleanup") or [])
        if cleanup:
            try:
                await poller.remove(cleanup)
            except (SlurmError, OSError) as exc:  # the job is done either way; the file is mode 600
                self.log.warning("Could not delete %s: %s", ", ".join(cleanup), exc)
        self.log.info("%s", completed_message(result))
        return TaskSuccessEvent()

    def _log_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.log.info("%s", line)

    def _loop_deadline(self, engine: WaitEngine) -> float | None:
        left = engine.seconds_left(time.time())
        return None if left is None else asyncio.get_running_loop().time() + left

    async def _tail(self, poller: Any, path: str) -> bytes | str:
        try:
            return await poller.read_tail(path, DEFAULT_TAIL_BYTES)
        except Exception as exc:
            return f"(could not read {path}: {exc})"

    # --- where the log stopped (survives a triggerer restart) ---------------------------------

    async def _resume_logs(self, engine: WaitEngine) -> Any:
        """The log follower, once it is safe to show the job's lines: the triggerer's masker knows
        the job's secrets, and the follower starts after the last line any earlier run of this
        trigger delivered. ``None`` while either cannot be done (the API is unreachable): then
        only the job's state is followed, and the next update tries again."""
        ti = self.task_instance
        try:
            if self.secret_refs and not self._masked:
                await _in_thread(mask_refs, self.secret_refs)
                self._masked = True
            stored = await _in_thread(_get_xcom, ti, XCOM_LOG_OFFSETS) if ti is not None else None
        except Exception as exc:
            if not self._hold_warned:
                self.log.warning("Not streaming the log of Slurm job %s until its secrets are masked and the "
                                 "lines already shown are known (%s)", self.job_id, exc)
                self._hold_warned = True
            return None
        for path, offset in (stored or {}).items():
            if int(offset) > engine.delivered.get(path, 0):
                engine.delivered[path] = int(offset)
        if stored:
            self.log.info("Slurm job %s: resuming its log after the lines already shown", self.job_id)
        return engine.follower()

    async def _save_offsets(self, delivered: dict[str, int], saved: dict[str, int]) -> dict[str, int]:
        ti = self.task_instance
        if ti is None:
            return dict(delivered)
        try:
            await _in_thread(_set_xcom, ti, XCOM_LOG_OFFSETS, dict(delivered))
        except Exception as exc:  # the next batch tries again; a restart may repeat these lines
            self.log.warning("Could not record the log offsets of Slurm job %s: %s", self.job_id, exc)
            return saved
        return dict(delivered)

    # --- cancel only when sure ----------------------------------------------------------------

    async def _still_deferred(self) -> bool | None:
        """Whether the task instance is still DEFERRED on this job (``None``: cannot tell)."""
        ti = self.task_instance
        if ti is None:
            return None
        try:
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

            states = await _in_thread(
                RuntimeTaskInstance.get_task_states,
                dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index,
            )
            key = ti.task_id if (ti.map_index is None or ti.map_index < 0) else f"{ti.task_id}_{ti.map_index}"
            state = (states.get(ti.run_id) or {}).get(key)
            if str(getattr(state, "value", state)) != "deferred":
                return False
            # Deferred, but on which job? A cleared task may already wait on a new one.
            record = await _in_thread(_get_xcom, ti, XCOM_JOB_KEY)
        except Exception as exc:
            self.log.warning("Could not read the state of task %s (%s)", ti.task_id, exc)
            return None
        if not isinstance(record, dict) or "job_id" not in record:
            return None
        return str(record["job_id"]) == self.job_id

    async def on_kill(self) -> None:
        """A user marked the deferred task failed/success or cleared it: scancel the job.

        Only when the task instance is known to be no longer deferred on this job; when that
        cannot be told, the job is left alone (see the module docstring). Never for sensors
        (``cancel_on_kill=False``).
        """
        if not self.cancel_on_kill:
            return
        deferred = await self._still_deferred()
        if deferred is None:
            self.log.warning("Cannot tell whether the task still waits on Slurm job %s: leaving the job "
                             "alone (the DAG's reap task cancels it if its task is over)", self.job_id)
            return
        if deferred:
            self.log.info("Task instance still deferred on Slurm job %s: trigger moved, not cancelling", self.job_id)
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


async def _in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking Task SDK call (it talks to the triggerer's supervisor) off the event loop."""
    from asgiref.sync import sync_to_async

    return await sync_to_async(func)(*args, **kwargs)


def _get_xcom(ti: Any, key: str) -> Any:
    from airflow.sdk.execution_time.xcom import XCom

    return XCom.get_one(key=key, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
                        map_index=ti.map_index if ti.map_index is not None else -1)


def _set_xcom(ti: Any, key: str, value: Any) -> None:
    from airflow.sdk.execution_time.xcom import XCom

    XCom.set(key, value, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
             map_index=ti.map_index if ti.map_index is not None else -1)


__all__ = ["SlurmJobTrigger"]
