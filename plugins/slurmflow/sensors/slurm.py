"""SlurmJobSensor: wait for a Slurm job that someone (or something) else submitted."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    BaseSensorOperator,
    PokeReturnValue,
)

from slurmflow.errors import SlurmError
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.logs import DEFAULT_TAIL_BYTES
from slurmflow.operators.outcome import DEFAULT_RETRY_STATES, normalize_states, raise_for_failure
from slurmflow.parsing import SlurmParseError, split_job_id
from slurmflow.paths import JobPaths
from slurmflow.triggers.slurm import SlurmJobTrigger
from slurmflow.wait import WaitEngine, WaitEvent, WaitSettings

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Task-state-store key of the wait engine's state (kept across reschedule pokes).
_STATE_KEY = "slurm_wait"


class SlurmJobSensor(BaseSensorOperator):
    """Succeed when a Slurm job (or job array) COMPLETED; fail when it ended otherwise.

    The job is not this task's: killing or clearing the sensor never cancels it. Deferrable
    waits share the triggerer's per-cluster poller with every other Slurm trigger.

    :param job_id: the job (or array job) id (templated).
    :param slurm_conn_id: SSH connection of the login node (templated).
    :param deferrable: wait in the triggerer (default) instead of poking from a worker.
    :param retry_states: end states raising ``AirflowException`` (Airflow may retry) instead of
        ``AirflowFailException``.
    :param log_path: the job's output file (``%j``/``%A``/``%a`` patterns allowed) to stream
        and to quote on failure (templated); ``None``: no logs.
    :param max_poll_interval: slowest poll interval while nothing changes (deferrable mode).
    :param missing_grace: seconds the job may be unknown to Slurm before the sensor fails.

    Returns (XCom) the job's facts: ``job_id``, ``state``, ``exit_code``, ``elapsed``,
    ``node_list``, ``restarts``, ``array``...
    """

    template_fields: Sequence[str] = ("job_id", "slurm_conn_id", "log_path")
    ui_color = "#e8f0fa"

    def __init__(
        self,
        *,
        job_id: str | int,
        slurm_conn_id: str = "slurm_default",
        deferrable: bool = True,
        retry_states: Collection[str] = DEFAULT_RETRY_STATES,
        log_path: str | None = None,
        max_poll_interval: float = 60.0,
        missing_grace: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job_id = str(job_id)
        self.slurm_conn_id = slurm_conn_id
        self.deferrable = deferrable
        self.retry_states = normalize_states(retry_states)
        self.log_path = log_path
        self.max_poll_interval = max_poll_interval
        self.missing_grace = missing_grace
        #: the wait engine's state between pokes when no task state store is at hand
        self._engine_state: dict[str, Any] | None = None

    @cached_property
    def hook(self) -> SlurmHook:
        return SlurmHook(self.slurm_conn_id)

    def _job_id(self) -> str:
        try:
            base, task = split_job_id(self.job_id)
        except SlurmParseError as exc:
            raise AirflowFailException(f"SlurmJobSensor: {exc}") from exc
        if task is not None:
            raise AirflowFailException(f"SlurmJobSensor waits for whole jobs or arrays, not task {self.job_id!r}")
        return base

    def _settings(self, deadline: float | None = None) -> WaitSettings:
        poke = self.poke_interval.total_seconds() if isinstance(self.poke_interval, timedelta) else self.poke_interval
        return WaitSettings(
            poll_interval=float(poke),
            max_poll_interval=max(float(poke), self.max_poll_interval),
            deadline=deadline,
            missing_grace=self.missing_grace,
            stream_logs=self.log_path is not None,
        )

    def _paths(self) -> JobPaths | None:
        if not self.log_path:
            return None
        return JobPaths.for_log(self.log_path, user=self.hook.username)

    def execute(self, context: Context) -> Any:
        job_id = self._job_id()
        if not self.deferrable:
            return super().execute(context)
        timeout = self.timeout.total_seconds() if isinstance(self.timeout, timedelta) else self.timeout
        paths = self._paths()
        self.defer(
            trigger=SlurmJobTrigger(
                job_id=job_id,
                slurm_conn_id=self.slurm_conn_id,
                settings=self._settings(time.time() + float(timeout) if timeout else None).to_dict(),
                paths=paths.to_dict() if paths else None,
                cancel_on_kill=False,
            ),
            method_name="execute_complete",
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """One step of the wait engine; its state (how long the job has been missing) is kept in
        the task state store, so it survives ``mode="reschedule"``."""
        job_id = self._job_id()
        engine = WaitEngine(job_id, self._settings(), self._paths())
        store = context.get("task_state_store")
        engine.restore(store.get(_STATE_KEY) if store is not None else self._engine_state)
        try:
            snap = self.hook.get_states([job_id])[job_id]
        except (SlurmError, SlurmParseError) as exc:
            # A transient problem: log and poke again; the sensor timeout bounds the wait.
            self.log.warning("Could not read the state of Slurm job %s: %s", job_id, exc)
            return False
        step = engine.observe(snap, time.time())
        for message in step.messages:
            self.log.info("%s", message)
        self._engine_state = engine.state()
        if store is not None:
            store.set(_STATE_KEY, self._engine_state)
        if step.event is None:
            return False
        event = step.event
        if step.tail_path:
            event = engine.with_tail(event, self._tail(step.tail_path))
        return PokeReturnValue(is_done=True, xcom_value=self._outcome(event))

    def _tail(self, path: str) -> bytes | str:
        try:
            return self.hook.tail(path, DEFAULT_TAIL_BYTES)
        except SlurmError as exc:
            return f"(could not read {path}: {exc})"

    def _outcome(self, event: WaitEvent) -> dict[str, Any]:
        """The job's facts (XCom) when it COMPLETED; otherwise the exception its end calls for."""
        if event.job_ended:
            if not event.snapshot.state.is_successful:
                raise_for_failure(event.snapshot, self.retry_states, event.log_tail)
            return event.snapshot.facts()
        if event.status == "timeout":
            raise AirflowSensorTimeout(event.message or "Slurm job still running at the sensor timeout")
        if event.status == "missing":
            raise AirflowFailException(event.message)
        raise AirflowException(f"waiting for Slurm job {self.job_id} failed: {event.message}")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = WaitEvent.from_payload(event)
        except ValueError as exc:
            raise AirflowException(f"waiting for Slurm job {self.job_id} failed: {exc}") from exc
        return self._outcome(parsed)
