"""Exactly once, against the real Slurm: retries re-attach, results are reused, unclear
failures are looked up before retrying, a clear cancels and resubmits. Zero duplicates."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import TaskDeferred

from slurmflow.errors import SlurmConnectionError
from slurmflow.identity import JobKey
from slurmflow.operators.slurm import XCOM_JOB_KEY
from tests.integration import test_slurm_fixtures as live
from tests.integration.test_slurm_fixtures import (
    LiveTI,
    make_operator,
    new_run_id,
    run_to_completion,
    sacct_settled,
    start,
    wait_state,
)

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn  # the fixture, shared by the Slurm integration modules


def test_retry_reattaches_to_the_live_job_then_reuses_its_result(slurm_conn, stack_env):
    run_id = new_run_id()
    name = JobKey("it_once", run_id, "train").job_name(0)
    # Try 1 submits and "dies" right after deferring (worker lost).
    _, first = start(make_operator(slurm_conn, command="sleep 4; echo done", retries=2),
                     LiveTI("it_once", run_id, "train", try_number=1, max_tries=2))
    assert isinstance(first, TaskDeferred)
    job_id = first.trigger.job_id
    # Try 2 (an automatic retry) finds the live job and follows it to the end.
    ti2 = LiveTI("it_once", run_id, "train", try_number=2, max_tries=2)
    result, _ = run_to_completion(make_operator(slurm_conn, command="sleep 4; echo done", retries=2), ti2)
    assert ti2.xcom[XCOM_JOB_KEY]["action"] == "attached"
    assert result["job_id"] == job_id and result["state"] == "COMPLETED"
    # Try 3 (the task was restarted after the job finished): the result is reused, nothing runs.
    ti3 = LiveTI("it_once", run_id, "train", try_number=3, max_tries=2)
    result3, _ = run_to_completion(make_operator(slurm_conn, command="sleep 4; echo done", retries=2), ti3)
    assert ti3.xcom[XCOM_JOB_KEY]["action"] == "reused" and result3["job_id"] == job_id
    assert sacct_settled(stack_env, name, ["COMPLETED"]) == [(job_id, "COMPLETED")]


def test_failed_job_is_submitted_anew(slurm_conn, stack_env):
    run_id = new_run_id()
    name = JobKey("it_once", run_id, "flaky").job_name(0)
    from airflow.providers.common.compat.sdk import AirflowFailException

    with pytest.raises(AirflowFailException):
        run_to_completion(make_operator(slurm_conn, task_id="flaky", command="exit 2", retries=1),
                          LiveTI("it_once", run_id, "flaky", try_number=1, max_tries=1))
    ti = LiveTI("it_once", run_id, "flaky", try_number=2, max_tries=1)
    result, _ = run_to_completion(make_operator(slurm_conn, task_id="flaky", command="true", retries=1), ti)
    assert ti.xcom[XCOM_JOB_KEY]["action"] == "submitted"
    states = [state for _, state in sacct_settled(stack_env, name, ["FAILED", "COMPLETED"])]
    assert states == ["FAILED", "COMPLETED"]


def test_dropped_connection_after_sbatch_does_not_duplicate(slurm_conn, stack_env):
    """sbatch ran, but the answer was lost: the lookup finds the job instead of submitting again."""
    run_id = new_run_id()
    name = JobKey("it_once", run_id, "lost").job_name(0)
    op = make_operator(slurm_conn, task_id="lost", command="sleep 2")
    real_run = op.hook.run

    def run_then_drop(argv, timeout=None):
        result = real_run(argv, timeout)
        if isinstance(argv, str) and "slurmflow-submit" in argv:
            op.hook.close()
            raise SlurmConnectionError("connection reset by peer (injected after sbatch ran)")
        return result

    op.hook.run = run_then_drop
    ti = LiveTI("it_once", run_id, "lost")
    _, deferred = start(op, ti)
    assert isinstance(deferred, TaskDeferred)
    assert ti.xcom[XCOM_JOB_KEY]["action"] == "attached"
    # Accounting learns of a new job a moment later: wait until it has the (short) job's end.
    jobs = sacct_settled(stack_env, name, ["COMPLETED"], timeout=40)
    assert jobs == [(deferred.trigger.job_id, "COMPLETED")]


def test_manual_clear_cancels_the_running_job_and_submits_a_fresh_one(slurm_conn, stack_env):
    run_id = new_run_id()
    _, first = start(make_operator(slurm_conn, task_id="cleared", command="sleep 120", retries=1),
                     LiveTI("it_once", run_id, "cleared", try_number=1, max_tries=1))
    old = first.trigger.job_id
    # Cleared in the UI while deferred, and the triggerer could not cancel (e.g. it was down):
    # Airflow sets max_tries = try_number + retries = 2 -> generation 1.
    ti = LiveTI("it_once", run_id, "cleared", try_number=2, max_tries=2)
    _, second = start(make_operator(slurm_conn, task_id="cleared", command="sleep 1", retries=1), ti)
    new = second.trigger.job_id
    assert new != old and ti.xcom[XCOM_JOB_KEY]["generation"] == 1
    assert ti.xcom[XCOM_JOB_KEY]["job_dir"].endswith("/cleared/g1")
    wait_state(stack_env, old, {"CANCELLED"})


@pytest.mark.slow
def test_after_min_job_age_sacct_answers_and_the_result_is_reused(slurm_conn, stack_env):
    """Once the controller forgot the job (MinJobAge), state and the exactly-once lookup come
    from accounting: a restarted task still reuses the result instead of running again."""
    import time

    from slurmflow.hooks.slurm import SlurmHook

    run_id = new_run_id()
    first, _ = run_to_completion(make_operator(slurm_conn, task_id="aged", command="echo ok"),
                                 LiveTI("it_once", run_id, "aged"))
    job_id = first["job_id"]
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if "Invalid job id" in live.ssh(stack_env, f"squeue -h -j {job_id}").stderr:
            break
        time.sleep(5)
    else:
        pytest.fail(f"job {job_id} never left squeue")
    hook = SlurmHook()
    snap = hook.get_states([job_id])[job_id]
    assert snap.source == "sacct" and snap.state.state.value == "COMPLETED"
    assert hook.command_counts == {"squeue": 1, "sacct": 1}
    ti = LiveTI("it_once", run_id, "aged", try_number=2, max_tries=0)
    again, _ = run_to_completion(make_operator(slurm_conn, task_id="aged", command="echo ok"), ti)
    assert ti.xcom[XCOM_JOB_KEY]["action"] == "reused" and again["job_id"] == job_id
