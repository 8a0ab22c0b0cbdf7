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
    BaseSensorOperator,
    PokeReturnValue,
)

from slurmflow.errors import SlurmError
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.operators.outcome import DEFAULT_RETRY_STATES, normalize_states, raise_for_failure
from slurmflow.parsing import SlurmParseError, split_job_id
from slurmflow.states import SlurmState
from slurmflow.status import JobSnapshot
from slurmflow.triggers.slurm import SlurmJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


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
        self._missing_since: float | None = None

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

    def execute(self, context: Context) -> Any:
        job_id = self._job_id()
        if not self.deferrable:
            return super().execute(context)
        timeout = self.timeout.total_seconds() if isinstance(self.timeout, timedelta) else self.timeout
        self.defer(
            trigger=SlurmJobTrigger(
                job_id=job_id,
                slurm_conn_id=self.slurm_conn_id,
                log_pattern=self.log_path,
                stream_logs=self.log_path is not None,
                poll_interval=float(self.poke_interval if not isinstance(self.poke_interval, timedelta)
                                    else self.poke_interval.total_seconds()),
                max_poll_interval=self.max_poll_interval,
                deadline=time.time() + float(timeout) if timeout else None,
                cancel_on_kill=False,
                missing_grace=self.missing_grace,
            ),
            method_name="execute_complete",
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        job_id = self._job_id()
        try:
            snap = self.hook.get_states([job_id])[job_id]
        except (SlurmError, SlurmParseError) as exc:
            # A transient problem: log and poke again; the sensor timeout bounds the wait.
            self.log.warning("Could not read the state of Slurm job %s: %s", job_id, exc)
            return False
        self.log.info("Slurm job %s: %s", job_id, snap.state)
        if snap.state.state is SlurmState.UNKNOWN:
            self._missing_since = self._missing_since or time.monotonic()
            if time.monotonic() - self._missing_since >= self.missing_grace:
                raise AirflowFailException(f"Slurm job {job_id} not found by squeue, sacct or scontrol")
            return False
        self._missing_since = None
        if not snap.state.is_terminal:
            return False
        return self._outcome(snap, tail=self._tail(snap))

    def _tail(self, snap: JobSnapshot) -> str:
        if snap.state.is_successful or not self.log_path:
            return ""
        from slurmflow.logs import tail_lines
        from slurmflow.sbatch import expand_log_path

        task = snap.first_failed_task
        path = expand_log_path(self.log_path, snap.job_id, task)
        try:
            return tail_lines(self.hook.tail(path), 50) if path else ""
        except SlurmError as exc:
            return f"(could not read {path}: {exc})"

    def _outcome(self, snap: JobSnapshot, tail: str) -> PokeReturnValue:
        if not snap.state.is_successful:
            raise_for_failure(snap, self.retry_states, tail)
        return PokeReturnValue(is_done=True, xcom_value=snap.facts())

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        status = event.get("status")
        if status in {"success", "failed"} and event.get("snapshot"):
            snap = JobSnapshot.from_dict(event["snapshot"])
            return self._outcome(snap, event.get("log_tail", "")).xcom_value
        if status == "timeout":
            from airflow.providers.common.compat.sdk import AirflowSensorTimeout

            raise AirflowSensorTimeout(event.get("message", "Slurm job still running at the sensor timeout"))
        raise AirflowException(f"waiting for Slurm job {self.job_id} failed: {event.get('message')}")
