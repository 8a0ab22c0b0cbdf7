"""Parsers against output recorded from the real local Slurm 22.05 (fixtures/slurm/*.txt)."""

from __future__ import annotations

import pytest

from slurmflow.parsing import (
    SlurmParseError,
    expand_array_indices,
    group_by_job,
    parse_duration,
    parse_sacct,
    parse_sbatch_parsable,
    parse_scontrol_jobs,
    parse_squeue,
    split_job_id,
)
from slurmflow.states import SlurmState
from tests.unit.fixtures.slurm.fakes import fixture


def by_name(records):
    return {r.name: r for r in records if r.array_task is None}


def test_squeue_recorded_mixed():
    records = parse_squeue(fixture("squeue_mixed.txt"))
    plain = by_name(records)
    assert plain["fx.completed"].state.state is SlurmState.COMPLETED
    assert plain["fx.completed"].state.exit_code == 0
    # squeue prints the raw wait status: 768 is exit code 3, 15 is SIGTERM.
    assert (plain["fx.failed"].state.exit_code, plain["fx.failed"].state.signal) == (3, 0)
    assert plain["fx.cancelled"].state.signal == 15
    assert plain["fx.requeued"].state.state is SlurmState.PENDING
    assert plain["fx.requeued"].state.restarts == 1
    assert plain["fx.requeued"].state.reason == "BeginTime"
    assert plain["fx.held"].state.reason == "JobHeldUser"
    assert plain["fx.timeout"].node_list == "local1"
    assert plain["fx.timeout"].elapsed_seconds == 11
    array = group_by_job(records)["23"]
    assert sorted(r.array_task for r in array) == [0, 1, 2, 3, 4, 5]
    assert {r.job_id for r in array} == {f"23_{i}" for i in range(6)}
    assert {r.array_task: r.state.state.value for r in array}[0] == "RUNNING"


def test_squeue_later_has_final_states():
    plain = by_name(parse_squeue(fixture("squeue_later.txt")))
    assert plain["fx.timeout"].state.state is SlurmState.TIMEOUT
    assert plain["fx.timeout"].state.reason == "TimeLimit"
    tasks = {r.array_task: r for r in parse_squeue(fixture("squeue_later.txt")) if r.base_id == "23"}
    assert tasks[3].state.state is SlurmState.FAILED
    assert tasks[3].state.exit_code == 1


def test_sacct_recorded_mixed():
    records = parse_sacct(fixture("sacct_mixed.txt"))
    plain = by_name(records)
    assert plain["fx.cancelled"].state.state is SlurmState.CANCELLED
    assert plain["fx.cancelled"].state.reason == "by 1001"
    assert plain["fx.failed"].state.exit_code == 3
    assert (plain["fx.signal"].state.exit_code, plain["fx.signal"].state.signal) == (0, 9)
    assert plain["fx.timeout"].state.state is SlurmState.TIMEOUT
    assert plain["fx.timeout"].elapsed_seconds == 81
    # Requeued once: two lines with --duplicates; the newest is current, one restart.
    assert plain["fx.requeued"].state.state is SlurmState.PENDING
    assert plain["fx.requeued"].state.restarts == 1
    assert plain["fx.held"].node_list == ""
    assert plain["fx.held"].start == ""
    tasks = {r.array_task: r for r in records if r.base_id == "23"}
    assert tasks[3].state.state is SlurmState.FAILED and tasks[3].state.exit_code == 1


def test_sacct_expands_pending_array_ranges():
    line = "9_[1-3%1]|9|wrap|PENDING|0:0|00:00:00|0|None assigned|JobArrayTaskLimit|2026-11-21T11:15:49|Unknown|Unknown"
    records = parse_sacct(line)
    assert [r.job_id for r in records] == ["9_1", "9_2", "9_3"]
    assert all(r.state.state is SlurmState.PENDING for r in records)


def test_scontrol_recorded():
    records = parse_scontrol_jobs(fixture("scontrol_mixed.txt"))
    assert records, "fixture has jobs"
    by_id = {r.job_id: r for r in records}
    assert by_id["4"].state.state is SlurmState.COMPLETED
    assert by_id["4"].name == "probe.abc.g0"
    assert by_id["5_0"].array_task == 0 and by_id["5_0"].base_id == "5"
    assert by_id["4"].elapsed_seconds == 3
    assert parse_scontrol_jobs("No jobs in the system\n") == []


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_squeue, "garbage without separators"),
        (parse_squeue, "1|1|N/A|x|RUNNING|None|0|0|n1|0:01|extra|"),
        (parse_squeue, "abc|abc|N/A|x|RUNNING|None|0|0|n1|0:01|"),
        (parse_squeue, "1|1|N/A|x|EXPLODED|None|0|0|n1|0:01|"),
        (parse_sacct, "1|1|x|COMPLETED|0:0"),
        (parse_sacct, "1|1|x|NOT_A_STATE|0:0|00:00:01|1|n1|None|a|b|c"),
        (parse_scontrol_jobs, "Something=else"),
        (parse_sbatch_parsable, "sbatch: error: nope"),
        (parse_sbatch_parsable, ""),
    ],
)
def test_malformed_output_names_the_line(parser, text):
    with pytest.raises(SlurmParseError) as err:
        parser(text)
    assert "sbatch" in str(err.value) or text.split("|")[0][:8] in str(err.value)


def test_sbatch_parsable():
    assert parse_sbatch_parsable("123\n") == "123"
    assert parse_sbatch_parsable("123;cluster\n") == "123"


@pytest.mark.parametrize(
    ("spec", "indices"),
    [("0-9%2", list(range(10))), ("1,3,5-7", [1, 3, 5, 6, 7]), ("0-15:4", [0, 4, 8, 12]), ("[2-4]", [2, 3, 4])],
)
def test_array_expansion(spec, indices):
    assert expand_array_indices(spec) == indices


@pytest.mark.parametrize("spec", ["", "a-b", "5-1", "0-9:0"])
def test_bad_array_expression(spec):
    with pytest.raises(SlurmParseError):
        expand_array_indices(spec)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:03", 3), ("01:02:03", 3723), ("1-00:00:01", 86401), ("", None), ("INVALID", None), ("2:30.500", 150)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_job_ids():
    assert split_job_id("123") == ("123", None)
    assert split_job_id("123_4") == ("123", 4)
    for bad in ["", "12;rm", "$(x)", "123_[1-2]"]:
        with pytest.raises(SlurmParseError):
            split_job_id(bad)


def test_range_lines_never_override_a_tasks_own_line():
    """Recorded from sacct after cancelling an array whose task 1 had failed: the range line
    names all tasks, including the two that ran."""
    text = (
        "551_0|552|wrap|CANCELLED by 1001|0:0|00:00:01|1|local1|None|2026-11-21T11:48:18|2026-11-21T11:48:19|2026-11-21T11:48:20\n"
        "551_1|553|wrap|FAILED|7:0|00:00:00|0|local1|None|2026-11-21T11:48:18|2026-11-21T11:48:19|2026-11-21T11:48:19\n"
        "551_[0-5%2]|551|wrap|CANCELLED by 1001|0:0|00:00:00|0|None assigned|None|2026-11-21T11:48:18|None|2026-11-21T11:48:20\n"
    )
    tasks = {r.array_task: r for r in parse_sacct(text)}
    assert sorted(tasks) == [0, 1, 2, 3, 4, 5]
    assert tasks[1].state.state is SlurmState.FAILED and tasks[1].state.exit_code == 7
    assert tasks[0].state.state is SlurmState.CANCELLED
    assert all(tasks[t].state.state is SlurmState.CANCELLED for t in (2, 3, 4, 5))
    assert all(r.state.restarts == 0 for r in tasks.values())


def test_preempted_is_the_end_in_the_controller_and_open_in_accounting():
    """squeue/scontrol show PREEMPTED only for a job Slurm did not requeue; sacct prints it for
    earlier runs too, so there the status fold decides (slurmflow.status)."""
    squeue = parse_squeue("250 |250 |N/A |pre-job2.sh |PREEMPTED |None |9 |0 |local1 |0:05 |\n")[0]
    assert squeue.state.ended and squeue.state.is_terminal and squeue.state.signal == 9
    scontrol = parse_scontrol_jobs("JobId=250 JobName=pre-job2.sh JobState=PREEMPTED Reason=None ExitCode=0:9 "
                                   "Restarts=0 RunTime=00:00:05 NodeList=local1\n")[0]
    assert scontrol.state.ended and scontrol.state.is_terminal
    sacct = parse_sacct("250|250|pre-job2.sh|PREEMPTED|0:0|00:00:05|5|local1|None|2026-12-02T01:12:41|"
                        "2026-12-02T01:12:41|2026-12-02T01:12:46\n")[0]
    assert not sacct.state.ended and not sacct.state.is_terminal and sacct.state.exit_code == 0
    requeued = parse_sacct(
        "248|248|j|PREEMPTED|0:0|00:00:27|27|local1|None|2026-12-02T01:11:53|2026-12-02T01:11:53|2026-12-02T01:12:20\n"
        "248|248|j|PENDING|0:0|00:00:00|0|None assigned|BeginTime|2026-12-02T01:12:24|Unknown|Unknown\n")
    assert [(r.state.state, r.state.restarts) for r in requeued] == [(SlurmState.PENDING, 1)]


def test_accounting_reason_is_only_kept_for_a_pending_run():
    """sacct's Reason is why the run waited (BeginTime after a requeue): not why it ended."""
    done, pending = (parse_sacct(
        "242|242|j|REQUEUED|0:0|00:00:05|5|local1|None|2026-12-02T01:05:33|2026-12-02T01:05:33|2026-12-02T01:05:38\n"
        f"242|242|j|{state}|0:0|00:00:41|41|local1|BeginTime|2026-12-02T01:05:38|{start}|{end}\n")[0]
        for state, start, end in (("COMPLETED", "2026-12-02T01:05:50", "2026-12-02T01:06:31"),
                                  ("PENDING", "Unknown", "Unknown")))
    assert (done.state.state, done.state.reason, done.state.restarts) == (SlurmState.COMPLETED, "", 1)
    assert (pending.state.state, pending.state.reason) == (SlurmState.PENDING, "BeginTime")
