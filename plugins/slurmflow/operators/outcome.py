"""From a finished Slurm job to a task outcome: the result dict, or the right exception.

Shared by the submit operator and the sensor, in both deferrable and blocking modes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

# The states that earn a retry by default (why: see slurmflow.constants, where every operator
# reads them at DAG parse).
from slurmflow.constants import DEFAULT_RETRY_STATES

if TYPE_CHECKING:  # annotations only: states and status (commands, parsing) stay out of DAG parsing
    from slurmflow.states import SlurmState
    from slurmflow.status import JobSnapshot


def normalize_states(states: Collection[str | SlurmState] | None) -> frozenset[str]:
    """Validate a set of state names (``"node_fail"``, ``SlurmState.TIMEOUT``...)."""
    if states is DEFAULT_RETRY_STATES:
        # The default is valid (tests/unit checks it): every operator's __init__ runs this at DAG
        # parse, which then needs no states module.
        return DEFAULT_RETRY_STATES
    from slurmflow.states import SlurmState

    result = set()
    for state in states or ():
        value = state.value if isinstance(state, SlurmState) else str(state).strip().upper()
        if value not in SlurmState.__members__:
            valid = ", ".join(s.value for s in SlurmState)
            raise ValueError(f"unknown Slurm state {state!r}; valid states: {valid}")
        result.add(value)
    return frozenset(result)


def result_dict(snapshot: JobSnapshot, job: Mapping[str, Any]) -> dict[str, Any]:
    """The task's XCom result: the job's facts plus where its files are.

    :param snapshot: the final snapshot.
    :param job: what was recorded at submission (``job_dir``, ``log_path``, ``script_path``...).
    """
    facts = snapshot.facts()
    return {
        **facts,
        "job_id": snapshot.job_id,
        "job_name": facts.get("job_name") or job.get("job_name", ""),
        "job_dir": job.get("job_dir", ""),
        "log_path": job.get("log_path", ""),
        "script_path": job.get("script_path", ""),
        "paths": job.get("paths"),
        "cluster": job.get("cluster", ""),
        "action": job.get("action", ""),
        "generation": job.get("generation"),
        "identity": job.get("identity"),
        "run_key": job.get("run_key"),
    }


def completed_message(result: Mapping[str, Any]) -> str:
    """The line a successful job's task logs (from the worker or from the trigger)."""
    return (f"Slurm job {result['job_id']} COMPLETED in {result.get('elapsed') or '?'} on "
            f"{result.get('node_list') or '?'} (restarts: {result.get('restarts')})")


def failure_message(snapshot: JobSnapshot, tail: str = "") -> str:
    state = snapshot.state
    parts = [f"Slurm job {snapshot.job_id} ended {state.state.value}"]
    if state.reason and state.reason != "None":
        parts.append(f"reason: {state.reason}")
    if state.exit_code is not None:
        parts.append(f"exit code {state.exit_code}" + (f", signal {state.signal}" if state.signal else ""))
    if snapshot.elapsed_seconds is not None:
        parts.append(f"after {snapshot.facts()['elapsed']}")
    if snapshot.node_list:
        parts.append(f"on {snapshot.node_list}")
    if state.restarts:
        parts.append(f"restarts: {state.restarts}")
    progress = snapshot.progress
    if progress:
        parts.append(f"array: {progress}; failed tasks {list(progress.failed_tasks)}")
    message = "; ".join(parts)
    if tail:
        message += f"\n--- last lines of the job log ---\n{tail}"
    return message


def raise_for_failure(snapshot: JobSnapshot, retry_states: Collection[str], tail: str = "") -> None:
    """Raise ``AirflowException`` (Airflow may retry) for retry states, else ``AirflowFailException``."""
    message = failure_message(snapshot, tail)
    if snapshot.state.state.value in retry_states:
        raise AirflowException(message + "\n(state is in retry_states: the task may be retried)")
    raise AirflowFailException(message)
