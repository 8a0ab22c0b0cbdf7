"""SlurmJobTrigger over the shared poller and a fake cluster: events, live log lines, on_kill."""

from __future__ import annotations

import asyncio
import time

import pytest

from slurmflow import poller as poller_mod
from slurmflow.triggers.slurm import SlurmJobTrigger
from tests.unit.fixtures.slurm.fakes import FakeAsyncHook, FakeCluster


class RecordingLog:
    def __init__(self):
        self.lines: list[str] = []

    def _record(self, msg, *args, **kwargs):
        self.lines.append(msg % args if args else str(msg))

    info = warning = error = debug = exception = _record


@pytest.fixture
def cluster(monkeypatch):
    cluster = FakeCluster()
    monkeypatch.setattr(poller_mod, "COALESCE_SECONDS", 0.0)
    monkeypatch.setattr(poller_mod, "LINGER_SECONDS", 0.0)
    monkeypatch.setattr(poller_mod, "_default_hook", lambda conn_id: FakeAsyncHook(cluster))
    return cluster


def make(job_id, **kw):
    kw.setdefault("poll_interval", 0.01)
    kw.setdefault("max_poll_interval", 0.02)
    trigger = SlurmJobTrigger(job_id=job_id, **kw)
    trigger._log = RecordingLog()
    return trigger


async def first_event(trigger, during=None):
    gen = trigger.run()
    task = asyncio.ensure_future(gen.__anext__())
    if during is not None:
        await during()
    event = await asyncio.wait_for(task, 10)
    await gen.aclose()
    return event.payload


def test_serializes_to_plain_types_and_back():
    trigger = SlurmJobTrigger(job_id="12", paths={"job_dir": "/j", "output": "/j/slurm-%j.out"},
                              log_offsets={"/j/slurm-12.out": 5}, settings={"deadline": 123.0}, expected_tasks=4)
    path, kwargs = trigger.serialize()
    assert path == "slurmflow.triggers.slurm.SlurmJobTrigger"
    import json

    json.dumps(kwargs)
    assert SlurmJobTrigger(**kwargs).serialize() == (path, kwargs)


def test_accepts_the_keywords_of_triggers_serialized_before_the_wait_engine():
    old = SlurmJobTrigger(job_id="12", log_pattern="/j/slurm-%j.out", user="alice", poll_interval=5.0,
                          max_poll_interval=30.0, deadline=123.0, missing_grace=60.0, tail_lines=20)
    assert old.paths.output == "/j/slurm-%j.out" and old.paths.user == "alice"
    assert (old.settings.poll_interval, old.settings.deadline, old.settings.tail_lines) == (5.0, 123.0, 20)


def test_streams_new_lines_then_succeeds(cluster, tmp_path):
    job = cluster.add_job("a", "RUNNING")
    log = tmp_path / f"slurm-{job.job_id}.out"
    log.write_text("epoch 1\npart")
    trigger = make(job.job_id, log_pattern=str(tmp_path / "slurm-%j.out"))

    async def progress():
        await asyncio.sleep(0.1)
        with log.open("a") as f:
            f.write("ial line\nepoch 2\n")
        await asyncio.sleep(0.1)
        job.state = "COMPLETED"

    event = asyncio.run(first_event(trigger, progress))
    assert event["status"] == "success"
    assert event["snapshot"]["state"] == "COMPLETED" and event["snapshot"]["final"]
    streamed = [line for line in trigger.log.lines if line.startswith("[slurm")]
    assert streamed == [f"[slurm {job.job_id}] epoch 1", f"[slurm {job.job_id}] partial line", f"[slurm {job.job_id}] epoch 2"]
    assert event["log_offsets"][str(log)] == log.stat().st_size


def test_failure_event_carries_the_log_tail(cluster, tmp_path):
    job = cluster.add_job("a", "FAILED", exit_code="1:0")
    (tmp_path / f"slurm-{job.job_id}.out").write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: boom\n")
    event = asyncio.run(first_event(make(job.job_id, log_pattern=str(tmp_path / "slurm-%j.out"), tail_lines=3)))
    assert event["status"] == "failed"
    assert event["log_tail"] == "line 98\nline 99\nTraceback: boom"
    assert event["snapshot"]["exit_code"] == 1


def test_requeue_is_followed_with_restart_count(cluster):
    job = cluster.add_job("a", "RUNNING")
    trigger = make(job.job_id)

    async def requeue():
        await asyncio.sleep(0.05)
        job.state, job.restarts, job.reason = "REQUEUED", 1, "BeginTime"
        await asyncio.sleep(0.05)
        job.state = "PENDING"
        await asyncio.sleep(0.05)
        job.state = "RUNNING"
        await asyncio.sleep(0.05)
        job.state = "COMPLETED"

    event = asyncio.run(first_event(trigger, requeue))
    assert event["status"] == "success" and event["snapshot"]["restarts"] == 1
    assert any("restarts=1" in line for line in trigger.log.lines)


def test_unknown_job_ends_with_an_error_not_a_hang(cluster):
    event = asyncio.run(first_event(make("999", missing_grace=0.05)))
    assert event["status"] == "missing" and "999 not found" in event["message"]


def test_deadline_fires_a_timeout_event(cluster):
    job = cluster.add_job("a", "RUNNING")
    event = asyncio.run(first_event(make(job.job_id, deadline=time.time() + 0.1)))
    assert event["status"] == "timeout"


def test_unreachable_cluster_becomes_an_error_event(cluster, monkeypatch):
    broken = FakeAsyncHook(cluster)
    broken.fail_with = OSError("[Errno 111] Connection refused")
    monkeypatch.setattr(poller_mod, "_default_hook", lambda conn_id: broken)
    event = asyncio.run(first_event(make("5", failure_limit=2, failure_patience=0, poll_interval=0.001,
                                                max_poll_interval=0.002)))
    assert event["status"] == "error" and "Connection refused" in event["message"]


def test_array_cancel_rest_on_first_failure(cluster):
    job = cluster.add_job("arr", "RUNNING", array=[0, 1, 2], task_states={0: "FAILED", 1: "RUNNING", 2: "PENDING"})
    event = asyncio.run(first_event(make(job.job_id, cancel_array_on_failure=True, expected_tasks=3)))
    assert ["scancel", job.job_id] in cluster.calls
    assert event["status"] == "failed"
    assert event["snapshot"]["array"]["failed_tasks"] == [0, 1, 2]


def test_on_kill_cancels_when_the_user_acted(cluster):
    job = cluster.add_job("a", "RUNNING")
    trigger = make(job.job_id)

    async def not_deferred():
        return False

    trigger._still_deferred = not_deferred
    asyncio.run(trigger.on_kill())
    assert job.state == "CANCELLED"


def test_on_kill_spares_the_job_when_the_task_is_still_deferred(cluster):
    job = cluster.add_job("a", "RUNNING")
    trigger = make(job.job_id)

    async def deferred():
        return True

    trigger._still_deferred = deferred
    asyncio.run(trigger.on_kill())
    assert job.state == "RUNNING"


def test_sensor_triggers_never_cancel(cluster):
    job = cluster.add_job("a", "RUNNING")
    asyncio.run(make(job.job_id, cancel_on_kill=False).on_kill())
    assert job.state == "RUNNING"


def test_still_deferred_reads_the_task_state_and_its_job(monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.execution_time import task_runner

    from slurmflow.triggers import slurm as trigger_mod

    seen = {}

    def states(**kwargs):
        seen.update(kwargs)
        return {"run1": {"train_2": "deferred"}}

    monkeypatch.setattr(task_runner.RuntimeTaskInstance, "get_task_states", staticmethod(states))
    record = {"job_id": "1"}
    monkeypatch.setattr(trigger_mod, "_get_xcom", lambda ti, key: record if key == "slurm_job" else None)
    trigger = make("1")
    trigger._task_instance = SimpleNamespace(dag_id="d", run_id="run1", task_id="train", map_index=2)
    assert asyncio.run(trigger._still_deferred()) is True
    assert seen == {"dag_id": "d", "task_ids": ["train"], "run_ids": ["run1"], "map_index": 2}
    record["job_id"] = "2"  # cleared and deferred again, on a new job: this one may go
    assert asyncio.run(trigger._still_deferred()) is False
    monkeypatch.setattr(task_runner.RuntimeTaskInstance, "get_task_states",
                        staticmethod(lambda **kw: {"run1": {"train_2": "failed"}}))
    assert asyncio.run(trigger._still_deferred()) is False


def test_on_kill_leaves_the_job_alone_when_the_api_cannot_answer(cluster, monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.execution_time import task_runner

    def unreachable(**kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(task_runner.RuntimeTaskInstance, "get_task_states", staticmethod(unreachable))
    job = cluster.add_job("a", "RUNNING")
    trigger = make(job.job_id)
    trigger._task_instance = SimpleNamespace(dag_id="d", run_id="r", task_id="train", map_index=-1)
    asyncio.run(trigger.on_kill())
    assert job.state == "RUNNING"
    assert any("leaving the job alone" in line for line in trigger.log.lines)
    assert not any(c[0] == "scancel" for c in cluster.calls)


def test_restarted_trigger_resumes_the_log_after_the_delivered_lines(cluster, tmp_path, monkeypatch):
    """A trigger run twice (a triggerer restart) shows each line once: the first run records the
    delivered offsets in XCom, the second starts there."""
    from types import SimpleNamespace

    from slurmflow.triggers import slurm as trigger_mod

    store: dict[str, object] = {}
    monkeypatch.setattr(trigger_mod, "_get_xcom", lambda ti, key: store.get(key))
    monkeypatch.setattr(trigger_mod, "_set_xcom", lambda ti, key, value: store.__setitem__(key, value))
    job = cluster.add_job("a", "RUNNING")
    log = tmp_path / f"slurm-{job.job_id}.out"
    log.write_text("line 1\nline 2\nhalf")
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id="train", map_index=-1)

    async def run_until_offsets_saved(trigger):
        gen = trigger.run()
        task = asyncio.ensure_future(gen.__anext__())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.get("slurm_log_offsets"):
                break
        task.cancel()  # the triggerer dies
        with pytest.raises(asyncio.CancelledError):
            await task

    first = make(job.job_id, paths={"job_dir": str(tmp_path), "output": str(tmp_path / "slurm-%j.out")})
    first._task_instance = ti
    asyncio.run(run_until_offsets_saved(first))
    assert store["slurm_log_offsets"] == {str(log): len("line 1\nline 2\n")}

    with log.open("a") as f:
        f.write(" done\nline 3\n")
    job.state = "COMPLETED"
    second = make(job.job_id, paths={"job_dir": str(tmp_path), "output": str(tmp_path / "slurm-%j.out")})
    second._task_instance = ti
    event = asyncio.run(first_event(second))
    assert event["status"] == "success"
    shown = [line for t in (first, second) for line in t.log.lines if line.startswith("[slurm")]
    assert shown == [f"[slurm {job.job_id}] line 1", f"[slurm {job.job_id}] line 2",
                     f"[slurm {job.job_id}] half done", f"[slurm {job.job_id}] line 3"]


# --- ending a successful task in the triggerer (finish) -------------------------------------------


def test_with_finish_a_success_ends_the_task_here_with_its_result_and_no_secrets_file(cluster, monkeypatch):
    """No resume on a worker: the triggerer records the result XCom the operator's
    execute_complete would return (through the Task SDK), deletes the job's secrets file and
    marks the task successful."""
    from types import SimpleNamespace

    from airflow.triggers.base import TaskSuccessEvent

    from slurmflow.triggers import slurm as trigger_mod

    written = {}
    monkeypatch.setattr(trigger_mod, "_set_xcom", lambda ti, key, value: written.update({key: value}))
    job = cluster.add_job("a", "RUNNING")
    cluster.files["/jobs/a/.slurmflow-secrets"] = "export X=1\n"
    record = {"job_id": job.job_id, "job_dir": "/jobs/a", "run_key": "d/r/train/-1/g0", "generation": 0}
    trigger = make(job.job_id, finish={"job": record, "cleanup": ["/jobs/a/.slurmflow-secrets"]})
    trigger.task_instance = SimpleNamespace(dag_id="d", task_id="train", run_id="r", map_index=-1)
    assert trigger.serialize()[1]["finish"] == {"job": record, "cleanup": ["/jobs/a/.slurmflow-secrets"]}

    async def end():
        await asyncio.sleep(0.05)
        job.state = "COMPLETED"

    async def run():
        gen = trigger.run()
        task = asyncio.ensure_future(gen.__anext__())
        await end()
        event = await asyncio.wait_for(task, 10)
        await gen.aclose()
        return event

    event = asyncio.run(run())
    assert isinstance(event, TaskSuccessEvent) and not event.xcoms
    result = written["return_value"]
    assert (result["job_id"], result["state"], result["job_dir"], result["run_key"]) == (
        job.job_id, "COMPLETED", "/jobs/a", "d/r/train/-1/g0")
    assert ["rm", "-f", "--", "/jobs/a/.slurmflow-secrets"] in cluster.calls
    assert any(line.startswith(f"Slurm job {job.job_id} COMPLETED in") for line in trigger.log.lines)


def test_with_finish_but_no_way_to_record_the_result_the_task_resumes(cluster):
    """The result XCom could not be written (no task instance, API down): the worker's
    execute_complete does it all, so nothing is lost and the file is left for it to delete."""
    job = cluster.add_job("a", "COMPLETED")
    trigger = make(job.job_id, finish={"job": {"job_id": job.job_id}, "cleanup": ["/jobs/a/.slurmflow-secrets"]})
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "success" and event["snapshot"]["state"] == "COMPLETED"
    assert not any(c[0] == "rm" for c in cluster.calls)


def test_with_finish_a_failure_still_resumes_the_task(cluster):
    """Retries, cancellation on the last try and the failure's message stay in execute_complete."""
    job = cluster.add_job("a", "FAILED", exit_code="1:0")
    trigger = make(job.job_id, finish={"job": {"job_id": job.job_id}, "cleanup": ["/jobs/a/.slurmflow-secrets"]})
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "failed"
    assert not any(c[0] == "rm" for c in cluster.calls), "a failed job's task cleans up on its worker"
