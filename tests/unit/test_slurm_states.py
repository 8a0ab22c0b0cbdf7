"""Job states: one type for every Slurm state, RunState-style predicates, array aggregation."""

from __future__ import annotations

import pytest

from slurmflow.states import ArrayProgress, JobState, SlurmState, aggregate_states, parse_exit_code

TERMINAL = {
    "NODE_FAIL", "BOOT_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "DEADLINE", "REVOKED",
    "CANCELLED", "FAILED", "COMPLETED",
}


@pytest.mark.parametrize("state", list(SlurmState))
def test_every_state_has_a_verdict(state):
    assert state.is_terminal is (state.value in TERMINAL)
    assert state.is_successful is (state is SlurmState.COMPLETED)


@pytest.mark.parametrize(
    "name",
    ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
     "SPECIAL_EXIT", "RESIZING", "SUSPENDED", "STOPPED", "PREEMPTED", "UNKNOWN"],
)
def test_requeue_and_live_states_are_not_terminal(name):
    assert not SlurmState(name).is_terminal
    assert not JobState(SlurmState(name)).is_terminal


def test_preempted_is_the_end_only_when_marked_ended():
    """Slurm may requeue a preempted job (PreemptMode=REQUEUE): PREEMPTED alone keeps the wait
    going; the status fold marks it ended when nothing will bring the job back."""
    preempted = JobState(SlurmState.PREEMPTED, exit_code=0, signal=15)
    assert not preempted.is_terminal and SlurmState.PREEMPTED.ends_run
    ended = preempted.as_ended()
    assert ended.ended and ended.is_terminal and not ended.is_successful
    assert JobState.from_dict(ended.to_dict()) == ended
    # as_ended changes nothing else, and nothing but PREEMPTED
    assert JobState(SlurmState.PENDING).as_ended() == JobState(SlurmState.PENDING)
    assert not JobState(SlurmState.RUNNING, ended=True).is_terminal


def test_the_controller_never_lists_a_requeued_job_as_preempted():
    # submit-once asks squeue for these: a PREEMPTED job there is one Slurm did not requeue.
    live = {s for s in SlurmState if s.is_live_in_controller}
    assert SlurmState.PREEMPTED not in live and SlurmState.UNKNOWN not in live
    assert {SlurmState.PENDING, SlurmState.RUNNING, SlurmState.REQUEUED, SlurmState.REQUEUE_HOLD,
            SlurmState.COMPLETING} <= live
    assert not live & {s for s in SlurmState if s.is_terminal}


@pytest.mark.parametrize(
    ("text", "state", "detail"),
    [
        ("CANCELLED by 1001", SlurmState.CANCELLED, "by 1001"),
        ("CANCELLED+", SlurmState.CANCELLED, ""),
        ("completed", SlurmState.COMPLETED, ""),
        ("CD", SlurmState.COMPLETED, ""),
        ("OOM", SlurmState.OUT_OF_MEMORY, ""),
        ("PD", SlurmState.PENDING, ""),
        ("RQ", SlurmState.REQUEUED, ""),
        ("", SlurmState.UNKNOWN, ""),
        ("WEIRD_NEW_STATE", SlurmState.UNKNOWN, "WEIRD_NEW_STATE"),
    ],
)
def test_parse(text, state, detail):
    assert SlurmState.parse(text) == (state, detail)


def test_aggregate_arrays():
    S = SlurmState
    assert aggregate_states([]) is S.UNKNOWN
    assert aggregate_states([S.COMPLETED, S.COMPLETED]) is S.COMPLETED
    assert aggregate_states([S.COMPLETED, S.RUNNING, S.PENDING]) is S.RUNNING
    assert aggregate_states([S.FAILED, S.PENDING]) is S.PENDING  # not terminal while some still wait
    assert aggregate_states([S.COMPLETED, S.FAILED, S.CANCELLED]) is S.FAILED
    assert aggregate_states([S.FAILED, S.NODE_FAIL]) is S.NODE_FAIL
    assert aggregate_states([S.COMPLETED, S.TIMEOUT]) is S.TIMEOUT
    assert aggregate_states([S.REQUEUED, S.COMPLETED]) is S.REQUEUED
    # a preempted task may come back; one that ended preempted is a failure
    assert aggregate_states([S.PREEMPTED, S.COMPLETED]) is S.PREEMPTED
    ended = JobState(S.PREEMPTED, ended=True)
    assert aggregate_states([ended, JobState(S.COMPLETED)]) is S.PREEMPTED
    assert aggregate_states([ended, JobState(S.FAILED)]) is S.PREEMPTED
    assert aggregate_states([ended, JobState(S.RUNNING)]) is S.RUNNING


def test_array_progress():
    progress = ArrayProgress.from_task_states(
        {0: SlurmState.COMPLETED, 1: SlurmState.FAILED, 2: SlurmState.RUNNING, 3: SlurmState.CANCELLED}
    )
    assert progress.failed_tasks == (1, 3)
    assert progress.total == 4
    assert progress.to_dict()["counts"] == {"CANCELLED": 1, "COMPLETED": 1, "FAILED": 1, "RUNNING": 1}
    preempted = ArrayProgress.from_task_states(
        {0: JobState(SlurmState.PREEMPTED), 1: JobState(SlurmState.PREEMPTED, ended=True)}
    )
    assert preempted.failed_tasks == (1,) and preempted.counts == {"PREEMPTED": 2}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0", (0, 0)), ("1:0", (1, 0)), ("0:15", (0, 15)), ("", (None, None)), ("x", (None, None)), ("3", (3, None))],
)
def test_exit_codes(text, expected):
    assert parse_exit_code(text) == expected


def test_job_state_round_trip_and_text():
    state = JobState(SlurmState.FAILED, "NonZeroExitCode", 3, 0, restarts=2)
    assert JobState.from_dict(state.to_dict()) == state
    assert str(state) == "FAILED (NonZeroExitCode) exit=3:0 restarts=2"
    assert state.is_terminal and not state.is_successful
