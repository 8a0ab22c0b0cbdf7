"""The wait engine, step by step, on snapshots folded from recorded squeue/sacct output."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slurmflow.logs import LogChunk
from slurmflow.parsing import group_by_job, parse_sacct, parse_squeue
from slurmflow.paths import JobPaths
from slurmflow.states import JobState, SlurmState
from slurmflow.status import JobSnapshot, snapshot_from_records
from slurmflow.wait import LogFollower, WaitEngine, WaitEvent, WaitSettings, next_interval
from tests.unit.fixtures.slurm.fakes import fixture

PATHS = JobPaths("/jobs/x", "/jobs/x/slurm-%A_%a.out", user="u", job_name="fx.array")


def recorded(source: str, job_id: str) -> JobSnapshot:
    """One job's snapshot folded from a recorded squeue or sacct listing."""
    parse = parse_squeue if source.startswith("squeue") else parse_sacct
    return snapshot_from_records(job_id, group_by_job(parse(fixture(source)))[job_id], final=source.startswith("sacct"))


def snap(state: str, job_id: str = "7", **kw) -> JobSnapshot:
    return JobSnapshot(job_id, JobState(SlurmState(state), **kw))


def test_a_requeued_job_is_followed_not_finished():
    engine = WaitEngine("22")
    step = engine.observe(recorded("squeue_mixed.txt", "22"), now=0)
    assert step.event is None
    assert step.messages == ["Slurm job 22: PENDING (BeginTime) restarts=1"]


def test_a_failed_array_task_brings_its_own_log_tail_and_cancels_the_rest_once():
    engine = WaitEngine("23", WaitSettings(cancel_array_on_failure=True), PATHS)
    records = group_by_job(parse_sacct(fixture("sacct_mixed.txt")))["23"]
    # the same listing a little earlier: task 5 still running
    earlier = [replace(r, state=JobState(SlurmState.RUNNING)) if r.array_task == 5 else r for r in records]
    live = snapshot_from_records("23", earlier, final=False)
    first = engine.observe(live, now=0)
    assert first.cancel_rest and first.event is None
    assert "Array task(s) 3 of job 23 failed" in first.messages[-1]
    assert not engine.observe(live, now=1).cancel_rest  # asked once

    done = recorded("sacct_mixed.txt", "23")
    end = engine.observe(done, now=2)
    assert end.event.status == "failed" and end.event.snapshot.state.exit_code == 1
    assert end.tail_path == "/jobs/x/slurm-23_3.out"
    with_tail = engine.with_tail(end.event, b"partial first line\n" + b"".join(b"l%d\n" % i for i in range(80)))
    assert with_tail.log_tail.splitlines() == [f"l{i}" for i in range(30, 80)]


def test_success_and_the_exact_failure_message():
    engine = WaitEngine("18")
    assert engine.observe(recorded("sacct_mixed.txt", "18"), now=0).event.status == "success"
    failed = WaitEngine("19").observe(recorded("sacct_mixed.txt", "19"), now=0)
    assert failed.event.status == "failed" and failed.event.message == "Slurm job 19 ended FAILED exit=3:0"
    assert failed.tail_path is None  # no paths: no tail to read


def test_unknown_waits_out_the_grace_then_ends_as_missing_and_reappearing_resets_it():
    engine = WaitEngine("9", WaitSettings(missing_grace=60))
    assert engine.observe(JobSnapshot.unknown("9"), now=100).event is None
    assert engine.observe(JobSnapshot.unknown("9"), now=159).event is None
    assert engine.observe(snap("PENDING", "9"), now=160).event is None
    assert engine.observe(JobSnapshot.unknown("9"), now=200).event is None  # the clock restarted
    event = engine.observe(JobSnapshot.unknown("9"), now=260).event
    assert event.status == "missing" and "not found by squeue, sacct or scontrol for 60s" in event.message


def test_the_missing_clock_survives_a_reschedule():
    """The sensor's regression: in reschedule mode every poke is a new process."""
    settings = WaitSettings(missing_grace=60)
    first = WaitEngine("9", settings)
    first.observe(JobSnapshot.unknown("9"), now=0)
    saved = first.state()
    later = WaitEngine("9", settings)
    later.restore(saved)
    assert later.observe(JobSnapshot.unknown("9"), now=61).event.status == "missing"
    assert later.observe(JobSnapshot.unknown("9"), now=62).messages == []  # no repeated state line


def test_deadline_and_poll_failures():
    engine = WaitEngine("7", WaitSettings(deadline=50, failure_limit=3))
    assert engine.observe(snap("RUNNING"), now=10).event is None
    assert engine.poll_failed("ssh: connection refused", now=20).event is None
    assert engine.poll_failed("ssh: connection refused", now=21).event is None
    assert engine.observe(snap("RUNNING"), now=22).event is None  # a good poll resets the count
    assert engine.poll_failed("x", now=23).event is None
    assert engine.observe(snap("RUNNING"), now=50).event.status == "timeout"
    engine = WaitEngine("7", WaitSettings(failure_limit=2, failure_patience=0))
    engine.poll_failed("x", now=0)
    assert engine.poll_failed("boom", now=1).event.status == "error"
    # the default patience: failed polls end the wait only once they span 600 s
    engine = WaitEngine("7", WaitSettings(failure_limit=2))
    assert [engine.poll_failed("x", now=t).event for t in (0, 60, 300, 599)] == [None] * 4
    assert engine.poll_failed("still down", now=600).event.status == "error"
    engine = WaitEngine("7", WaitSettings(failure_limit=2))
    engine.poll_failed("x", now=0)
    engine.observe(snap("RUNNING"), now=500)  # back: the next outage starts its own clock
    assert engine.poll_failed("x", now=700).event is None and engine.poll_failed("x", now=1000).event is None


def test_lines_are_whole_and_delivered_offsets_exclude_the_unfinished_one():
    engine = WaitEngine("7", paths=PATHS)
    path = "/jobs/x/slurm-7.out"
    assert engine.lines("", LogChunk(path, 14, b"one\ntwo\nthr", 11)) == ["[slurm 7] one", "[slurm 7] two"]
    assert engine.delivered[path] == 8
    assert engine.lines("", LogChunk(path, 20, b"ee\n", 14)) == ["[slurm 7] three"]
    assert engine.delivered[path] == 14
    assert engine.lines("task 1", LogChunk("/l1", 3, b"end", 3), final=True) == ["[slurm 7 task 1] end"]
    assert engine.delivered["/l1"] == 3
    rewritten = engine.lines("", LogChunk(path, 4, b"new\n", 4, truncated=True))
    assert rewritten[0].endswith("was rewritten; showing it from the start") and rewritten[1] == "[slurm 7] new"


def test_a_restarted_engine_follows_from_the_delivered_offsets():
    engine = WaitEngine("7", paths=JobPaths("/j", "/j/slurm-%j.out"), offsets={"/j/slurm-7.out": 8})
    (label, read), = engine.follower().plan(snap("RUNNING"))
    assert (label, read.path, read.offset) == ("", "/j/slurm-7.out", 8)
    assert WaitEngine("7", WaitSettings(stream_logs=False), PATHS).follower() is None


def test_follower_reads_running_tasks_and_once_more_those_that_just_ended():
    follower = LogFollower(PATHS)
    tasks = {0: JobState(SlurmState.RUNNING), 1: JobState(SlurmState.PENDING)}
    assert [r.path for _, r in follower.plan(JobSnapshot("5", JobState(SlurmState.RUNNING), tasks))] == [
        "/jobs/x/slurm-5_0.out"]
    read(follower, follower.plan(JobSnapshot("5", JobState(SlurmState.RUNNING), tasks)))
    ended = {0: JobState(SlurmState.COMPLETED), 1: JobState(SlurmState.RUNNING)}
    planned = follower.plan(JobSnapshot("5", JobState(SlurmState.RUNNING), ended))
    assert [label for label, _ in planned] == ["task 0", "task 1"]
    read(follower, planned)
    assert [label for label, _ in follower.plan(JobSnapshot("5", JobState(SlurmState.RUNNING), ended))] == ["task 1"]


def read(follower, planned):
    """The reads succeeded: each chunk advances the follower."""
    for _, r in planned:
        follower.advance(LogChunk(r.path, 10, b"x\n", r.offset + 2))


def test_a_failed_read_of_a_job_that_just_ended_is_planned_again():
    """A job found already ended (a retry re-attaching to it) gets one last read; when that
    poll fails, the next one reads again instead of losing the job's lines (chaos smoke)."""
    follower = LogFollower(PATHS)
    done = JobSnapshot("5", JobState(SlurmState.COMPLETED))
    first = follower.plan(done)
    assert len(first) == 1
    # the read failed: nothing advanced
    again = follower.plan(done)
    assert [r.path for _, r in again] == [r.path for _, r in first]
    read(follower, again)
    assert follower.plan(done) == []


def test_event_payload_round_trip_and_validation():
    event = WaitEngine("18").observe(recorded("sacct_mixed.txt", "18"), now=0).event
    assert WaitEvent.from_payload(event.to_payload()) == event
    with pytest.raises(ValueError, match="not a Slurm wait event"):
        WaitEvent.from_payload({"status": "done"})
    with pytest.raises(ValueError, match="without the job's snapshot"):
        WaitEvent.from_payload({"status": "success", "job_id": "1"})


def test_settings_are_validated_and_pacing_backs_off():
    with pytest.raises(ValueError):
        WaitSettings(poll_interval=10, max_poll_interval=5)
    assert WaitSettings.from_dict({"poll_interval": 3, "log_pattern": "ignored"}).poll_interval == 3
    assert next_interval(None, 2, 60, changed=False) == 2
    assert next_interval(2, 2, 60, changed=False) == 2.5
    assert next_interval(50, 2, 60, changed=False) == 60
    assert next_interval(50, 2, 60, changed=True) == 2
    assert next_interval(50, 2, 60, changed=False, failures=3) == 16


def test_follower_reads_once_more_after_a_preemption_that_ended_the_job():
    follower = LogFollower(JobPaths("/j", "/j/slurm-%j.out"))
    read(follower, follower.plan(snap("RUNNING")))
    requeued = snap("PREEMPTED")  # Slurm will requeue it: not over, nothing to read now
    assert follower.plan(requeued) == []
    ended = snap("PREEMPTED", ended=True)  # PreemptMode=CANCEL: its last lines are read once
    planned = follower.plan(ended)
    assert [r.path for _, r in planned] == ["/j/slurm-7.out"]
    read(follower, planned)
    assert follower.plan(ended) == []
