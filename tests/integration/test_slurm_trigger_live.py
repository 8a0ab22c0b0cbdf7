"""Deferred waits against the real Slurm: live logs, outcomes, requeue, arrays, cancel, and the
shared poller's one-query-per-interval under load."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from slurmflow.hooks.slurm import SlurmHook
from slurmflow.poller import Subscription, get_poller
from slurmflow.triggers.slurm import SlurmJobTrigger
from tests.integration import test_slurm_fixtures as live
from tests.integration.test_slurm_fixtures import (
    LiveTI,
    RecordingLog,
    first_event,
    make_operator,
    new_run_id,
    run_to_completion,
    ssh,
    start,
    wait_state,
)

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn  # the fixture, shared by the Slurm integration modules


def test_live_log_lines_arrive_while_the_job_runs(slurm_conn):
    log = RecordingLog()
    op = make_operator(slurm_conn, command='for i in 1 2 3 4 5 6; do echo "tick $i"; sleep 1; done')
    ti = LiveTI("it_trigger", new_run_id(), "train")
    result, payload = run_to_completion(op, ti, log)
    job_id = result["job_id"]
    at = {line: t for t, line in log.records}
    first_tick = at[f"[slurm {job_id}] tick 1"]
    done = next(t for t, line in log.records if "COMPLETED" in line)
    # Lines reach the log while the job runs (a 0.5 s poll on a job printing every second),
    # not in one batch at the end.
    assert done - first_tick > 2, "tick 1 was logged well before the job ended"
    assert [line for line in log.lines if "] tick" in line] == [f"[slurm {job_id}] tick {i}" for i in range(1, 7)]
    # Outcome: job facts in XCom.
    assert result["state"] == "COMPLETED" and result["exit_code"] == 0
    assert result["node_list"] == "local1" and result["elapsed_seconds"] >= 5
    assert result["log_path"].endswith(f"slurm-{job_id}.out") and result["job_dir"] in result["log_path"]
    # The final facts come from sacct, or from squeue when it still lists the finished job
    # (within MinJobAge): which one answers first is timing, the facts above are the contract.
    assert payload["snapshot"]["source"] in {"sacct", "squeue"}


def test_failure_fails_the_task_with_reason_and_log_tail(slurm_conn):
    op = make_operator(slurm_conn, command='echo "loading data"; echo "ValueError: bad shard" >&2; exit 3')
    with pytest.raises(AirflowFailException) as err:
        run_to_completion(op, LiveTI("it_trigger", new_run_id(), "train"))
    message = str(err.value)
    assert "ended FAILED" in message and "exit code 3" in message
    assert "ValueError: bad shard" in message and "loading data" in message


def test_requeue_is_followed_as_one_task_with_restart_count(slurm_conn, stack_env):
    log = RecordingLog()
    op = make_operator(slurm_conn, command='echo "run ${SLURM_RESTART_COUNT:-0}"; sleep 6',
                       sbatch_options={"requeue": True})
    ti = LiveTI("it_trigger", new_run_id(), "train")
    ctx, deferred = start(op, ti)
    job_id = deferred.trigger.job_id

    async def requeue_once():
        await asyncio.to_thread(wait_state, stack_env, job_id, {"RUNNING"})
        await asyncio.sleep(1)
        out = await asyncio.to_thread(ssh, stack_env, f"scontrol requeue {job_id}")
        assert out.returncode == 0, out.stderr
        # Slurm holds a requeued job back (BeginTime) for about two minutes so that the old job
        # credential has expired; restarting within the same second gets "Job credential
        # revoked" (a FAILED job, which the trigger reports faithfully). Wait a little, then
        # let it start now.
        await asyncio.sleep(3)
        for _ in range(20):
            out = await asyncio.to_thread(ssh, stack_env, f"scontrol update jobid={job_id} starttime=now")
            if out.returncode == 0:
                break
            await asyncio.sleep(0.5)

    async def both():
        event, _ = await asyncio.gather(first_event(deferred.trigger, log), requeue_once())
        return event

    payload = asyncio.run(both())
    result = op.execute_complete(ctx, payload, **deferred.kwargs)
    assert result["job_id"] == job_id and result["state"] == "COMPLETED"
    assert result["restarts"] == 1
    states = " | ".join(line for line in log.lines if line.startswith("Slurm job"))
    assert "REQUEUED" in states or "PENDING" in states
    assert "restarts=1" in states
    assert f"[slurm {job_id}] run 0" in log.lines and f"[slurm {job_id}] run 1" in log.lines


def test_array_tasks_are_aggregated(slurm_conn):
    op = make_operator(slurm_conn, command='echo "task $SLURM_ARRAY_TASK_ID"; sleep 1',
                       sbatch_options={"array": "0-3%2"})
    log = RecordingLog()
    result, _ = run_to_completion(op, LiveTI("it_trigger", new_run_id(), "sweep"), log)
    assert result["state"] == "COMPLETED"
    assert result["array"] == {"counts": {"COMPLETED": 4}, "failed_tasks": [], "total": 4}
    for task in range(4):
        assert f"[slurm {result['job_id']} task {task}] task {task}" in log.lines


def test_array_cancels_the_rest_when_one_task_fails(slurm_conn, stack_env):
    op = make_operator(slurm_conn, command='[ "$SLURM_ARRAY_TASK_ID" != 1 ] || exit 7; sleep 30',
                       sbatch_options={"array": "0-5%2"}, cancel_array_on_failure=True)
    started = time.monotonic()
    with pytest.raises(AirflowFailException) as err:
        run_to_completion(op, LiveTI("it_trigger", new_run_id(), "sweep"))
    assert time.monotonic() - started < 25, "did not wait for the other tasks"
    message = str(err.value)
    assert "failed tasks" in message and "exit code 7" in message
    assert "1 FAILED" in message and "CANCELLED" in message


def test_trigger_on_kill_scancels_the_job(slurm_conn, stack_env):
    _, deferred = start(make_operator(slurm_conn, command="sleep 300"), LiveTI("it_trigger", new_run_id(), "train"))
    trigger = deferred.trigger
    job_id = trigger.job_id

    async def no_longer_deferred():
        return False

    trigger._still_deferred = no_longer_deferred

    async def user_marks_failed():
        task = asyncio.ensure_future(first_event(trigger))
        await asyncio.to_thread(wait_state, stack_env, job_id, {"RUNNING", "PENDING"})
        # What the triggerer does on mark failed / success / clear: cancel the run() task with
        # the user-action message, then call on_kill(), which asks the API (here: answers that
        # the task is no longer deferred; the real API's answer is covered by tests/e2e/test_cancel).
        task.cancel("__airflow_user_action__")
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.on_kill()

    asyncio.run(user_marks_failed())
    wait_state(stack_env, job_id, {"CANCELLED"})


def test_trigger_moved_between_triggerers_does_not_cancel(slurm_conn, stack_env):
    _, deferred = start(make_operator(slurm_conn, command="sleep 60"), LiveTI("it_trigger", new_run_id(), "train"))
    trigger = deferred.trigger

    async def still_deferred():
        return True

    trigger._still_deferred = still_deferred
    asyncio.run(trigger.on_kill())
    time.sleep(1)
    out = ssh(stack_env, f"squeue -h -j {trigger.job_id} -o %T")
    assert out.stdout.strip() in {"PENDING", "RUNNING"}
    SlurmHook().cancel([trigger.job_id])


def test_blocking_mode_on_kill_cancels(slurm_conn, stack_env):
    op = make_operator(slurm_conn, command="sleep 300", deferrable=False)
    ti = LiveTI("it_trigger", new_run_id(), "train")
    ctx = {"ti": ti}
    op.render_template_fields(ctx)
    errors: list[BaseException] = []

    def worker():
        try:
            op.execute(ctx)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "slurm_job" not in ti.xcom and time.monotonic() < deadline:
        time.sleep(0.2)
    job_id = ti.xcom["slurm_job"]["job_id"]
    wait_state(stack_env, job_id, {"RUNNING", "PENDING"})
    op.on_kill()  # what the task runner calls on SIGTERM (task killed / marked failed while running)
    thread.join(30)
    assert errors and isinstance(errors[0], AirflowFailException) and "CANCELLED" in str(errors[0])


@pytest.mark.slow
def test_one_squeue_per_interval_from_1_to_20_waiting_jobs(slurm_conn, stack_env):
    """20 held jobs: every poll round is one squeue, over one SSH connection, for 1 or 20 triggers."""
    hook = SlurmHook()
    tag = uuid.uuid4().hex[:6]
    ids = []
    for i in range(20):
        out = hook.run(["sbatch", "--parsable", "--hold", "-A", "research", "--output=/dev/null",
                        f"--job-name=it-hold-{tag}-{i}", "--wrap", "true"])
        ids.append(out.stdout.strip())

    async def measure(n):
        poller = get_poller("slurm_default")
        subs = [poller.subscribe(Subscription(job_id=j, min_interval=0.3, max_interval=0.3)) for j in ids[:n]]
        for _ in range(4):
            for s in subs:
                update = await asyncio.wait_for(s.next_update(), 30)
                assert update.snapshot and update.snapshot.state.state.value == "PENDING"
        rounds = [dict(q) for q in poller.round_queries[-3:]]
        connects = poller.hook.connects
        for s in subs:
            poller.unsubscribe(s)
        return rounds, connects

    try:
        one, c1 = asyncio.run(measure(1))
        twenty, c20 = asyncio.run(measure(20))
    finally:
        hook.cancel(ids)
    assert one == [{"squeue": 1}] * 3
    assert twenty == [{"squeue": 1}] * 3
    assert c1 == c20 == 1


def test_unreachable_host_ends_the_wait_with_the_cause(stack_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps(
        {"conn_type": "ssh", "host": "127.0.0.1", "port": 1, "login": "hpcuser",
         "extra": {"key_file": stack_env["SSH_KEY"], "no_host_key_check": True}}))
    from slurmflow import poller

    monkeypatch.setattr(poller, "COALESCE_SECONDS", 0.0)
    trigger = SlurmJobTrigger(job_id="1", poll_interval=0.2, max_poll_interval=0.4, failure_limit=2,
                              failure_patience=0)
    started = time.monotonic()
    payload = asyncio.run(first_event(trigger, RecordingLog(), timeout=60))
    assert payload["status"] == "error"
    assert "cannot connect to the Slurm login node" in payload["message"] and "127.0.0.1" in payload["message"]
    assert time.monotonic() - started < 30


def test_sensor_waits_for_someone_elses_job(slurm_conn, stack_env):
    from slurmflow.sensors.slurm import SlurmJobSensor

    out = ssh(stack_env, "sbatch --parsable -A research --output=/dev/null --wrap 'sleep 2'")
    job_id = out.stdout.strip()
    sensor = SlurmJobSensor(task_id="wait", job_id=job_id, poke_interval=0.5)
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    payload = asyncio.run(first_event(deferred.value.trigger, RecordingLog()))
    facts = sensor.execute_complete({}, payload)
    assert facts["job_id"] == job_id and facts["state"] == "COMPLETED"


def test_job_that_no_longer_exists_ends_as_missing(slurm_conn):
    trigger = SlurmJobTrigger(job_id="987654", poll_interval=0.3, max_poll_interval=0.5, missing_grace=2)
    payload = asyncio.run(first_event(trigger, RecordingLog(), timeout=30))
    assert payload["status"] == "missing" and "987654 not found by squeue, sacct or scontrol" in payload["message"]
