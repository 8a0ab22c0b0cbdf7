"""Status resolution: one squeue for all jobs, sacct only for finished/vanished ones, scontrol
without accounting; driven through a fake login node routing on argv[0]."""

from __future__ import annotations

import pytest

from slurmflow.errors import SlurmCommandError
from slurmflow.states import SlurmState
from slurmflow.status import CommandResult, JobSnapshot, ResolveOptions, resolve_states, run_sync
from tests.unit.fixtures.slurm.fakes import FakeCluster, fixture


def runner(cluster):
    from slurmflow.commands import to_shell

    def run(argv):
        code, out, err = cluster.exec(to_shell(argv))
        return CommandResult(code, out.decode(), err.decode())

    return run


def test_live_jobs_cost_one_squeue():
    cluster = FakeCluster()
    jobs = [cluster.add_job(f"j{i}", "RUNNING") for i in range(20)]
    snaps = run_sync(resolve_states([j.job_id for j in jobs]), runner(cluster))
    assert cluster.tools() == ["squeue"]
    assert all(s.state.state is SlurmState.RUNNING and not s.final for s in snaps.values())


def test_finished_jobs_add_one_sacct_for_all():
    cluster = FakeCluster()
    done = cluster.add_job("a", "COMPLETED")
    failed = cluster.add_job("b", "FAILED", exit_code="3:0")
    gone = cluster.add_job("c", "TIMEOUT", in_squeue=False)
    live = cluster.add_job("d", "RUNNING")
    snaps = run_sync(resolve_states([done.job_id, failed.job_id, gone.job_id, live.job_id]), runner(cluster))
    assert cluster.tools() == ["squeue", "sacct"]
    sacct_argv = cluster.calls[1]
    assert any(a.startswith("--jobs=") and live.job_id not in a.split("=")[1].split(",") for a in sacct_argv)
    assert snaps[done.job_id].final and snaps[done.job_id].source == "sacct"
    assert snaps[failed.job_id].state.exit_code == 3
    assert snaps[gone.job_id].state.state is SlurmState.TIMEOUT
    assert snaps[live.job_id].state.state is SlurmState.RUNNING


def test_unknown_everywhere_is_unknown_not_an_error():
    cluster = FakeCluster()
    snaps = run_sync(resolve_states(["424242"]), runner(cluster))
    assert snaps["424242"].state.state is SlurmState.UNKNOWN


def test_accounting_disabled_falls_back_to_scontrol():
    cluster = FakeCluster(accounting=False)
    job = cluster.add_job("a", "COMPLETED")
    opts = ResolveOptions()
    snaps = run_sync(resolve_states([job.job_id], opts), runner(cluster))
    assert cluster.tools() == ["squeue", "sacct", "scontrol"]
    assert opts.accounting is False
    assert snaps[job.job_id].state.state is SlurmState.COMPLETED and snaps[job.job_id].source == "scontrol"
    # Next round does not ask sacct again.
    cluster.calls.clear()
    run_sync(resolve_states([job.job_id], opts), runner(cluster))
    assert cluster.tools() == ["squeue", "scontrol"]


def test_requeued_job_follows_through_with_restart_count():
    cluster = FakeCluster()
    job = cluster.add_job("r", "PENDING", restarts=1, reason="BeginTime")
    snap = run_sync(resolve_states([job.job_id]), runner(cluster))[job.job_id]
    assert snap.state.state is SlurmState.PENDING and not snap.state.is_terminal
    assert snap.state.restarts == 1


def test_array_aggregation_and_vanished_tasks():
    cluster = FakeCluster()
    job = cluster.add_job("arr", "RUNNING", array=[0, 1, 2], task_states={0: "COMPLETED", 1: "FAILED", 2: "RUNNING"})
    snaps = run_sync(resolve_states([job.job_id]), runner(cluster))
    snap = snaps[job.job_id]
    assert snap.state.state is SlurmState.RUNNING
    assert snap.progress.failed_tasks == (1,)
    assert cluster.tools() == ["squeue"]
    # Expected 5 tasks but squeue shows 3: finished ones left memory -> ask sacct too.
    cluster.calls.clear()
    run_sync(resolve_states([job.job_id], ResolveOptions(expected_tasks={job.job_id: 5})), runner(cluster))
    assert cluster.tools() == ["squeue", "sacct"]


def test_controller_errors_name_the_tool():
    def broken(argv):
        return CommandResult(1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")

    with pytest.raises(SlurmCommandError, match="squeue failed.*Unable to contact slurm controller"):
        run_sync(resolve_states(["1"]), broken)


def test_malformed_output_raises_parse_error():
    from slurmflow.parsing import SlurmParseError

    with pytest.raises(SlurmParseError):
        run_sync(resolve_states(["1"]), lambda argv: CommandResult(0, "this is not squeue output\n"))


def test_recorded_outputs_resolve_end_to_end():
    """squeue_later + sacct_mixed as the tools' answers for the recorded jobs."""

    def recorded(argv):
        return CommandResult(0, fixture("squeue_later.txt" if argv[0] == "squeue" else "sacct_mixed.txt"))

    snaps = run_sync(resolve_states(["18", "19", "20", "21", "22", "23", "24", "25"]), recorded)
    assert snaps["18"].state.state is SlurmState.COMPLETED and snaps["18"].final
    assert snaps["19"].state.exit_code == 3
    assert snaps["21"].state.state is SlurmState.TIMEOUT
    assert snaps["22"].state.state is SlurmState.PENDING  # requeued, not terminal
    assert snaps["23"].state.state is SlurmState.FAILED and snaps["23"].progress.failed_tasks == (3,)
    assert snaps["23"].progress.total == 6


def test_snapshot_round_trip():
    cluster = FakeCluster()
    job = cluster.add_job("arr", "RUNNING", array=[0, 1], task_states={0: "COMPLETED", 1: "RUNNING"})
    snap = run_sync(resolve_states([job.job_id]), runner(cluster))[job.job_id]
    assert JobSnapshot.from_dict(snap.to_dict()) == snap


def test_a_task_that_failed_keeps_its_exit_code_when_accounting_folds_the_cancelled_array():
    """Right after cancelling the rest of an array, sacct may print one folded line for every
    task (``119_[0-5%2] CANCELLED``) while the controller still shows task 1 FAILED with exit 7:
    the failure, and its exit code, must survive into the final snapshot."""
    squeue = "\n".join(
        f"119_{t}|119|{t}|sweep|{state}|None|{code}|0|local1|0:01|"
        for t, state, code in [(0, "CANCELLED", "0:15"), (1, "FAILED", "7:0"), (2, "CANCELLED", "0:0"),
                               (3, "CANCELLED", "0:0"), (4, "CANCELLED", "0:0"), (5, "CANCELLED", "0:0")]
    )
    sacct = ("119_[0-5%2]|119|sweep|CANCELLED by 1001|0:0|00:00:00|0|None assigned|None|"
             "2026-12-01T23:42:33|None|2026-12-01T23:42:35")
    outputs = {"squeue": squeue, "sacct": sacct}
    snaps = run_sync(resolve_states(["119"]), lambda argv: CommandResult(0, outputs[argv[0]] + "\n"))
    snap = snaps["119"]
    assert snap.tasks[1].state is SlurmState.FAILED and snap.tasks[1].exit_code == 7
    assert snap.state.state is SlurmState.FAILED and snap.state.exit_code == 7
    assert snap.first_failed_task == 1


# --- preemption: recorded on the local Slurm (partition spot, PreemptMode=REQUEUE, then CANCEL) ---

_SQUEUE = "{id} |{id} |N/A |pre-job2.sh |{state} |{reason} |{code} |{restarts} |{nodes} |0:05 |"
_PREEMPTED_RUN = ("248|248|pre-job2.sh|PREEMPTED|0:0|00:00:27|27|local1|None|2026-12-02T01:11:53|"
                  "2026-12-02T01:11:53|2026-12-02T01:12:20")
_REQUEUED_RUN = ("248|248|pre-job2.sh|RUNNING|0:0|00:00:01|1|local1|BeginTime|2026-12-02T01:12:24|"
                 "2026-12-02T01:12:35|Unknown")


def _answers(squeue: str | None, sacct: str):
    def run(argv):
        if argv[0] == "squeue":
            if squeue is None:
                return CommandResult(1, "", "slurm_load_jobs error: Invalid job id specified")
            return CommandResult(0, squeue + "\n")
        if argv[0] == "sacct":
            return CommandResult(0, sacct + "\n")
        raise AssertionError(argv)

    return run


@pytest.mark.parametrize("state, reason, nodes", [("COMPLETING", "None", "local1"), ("PENDING", "BeginTime", "")])
def test_a_job_requeued_on_preemption_is_followed_while_accounting_says_preempted(state, reason, nodes):
    """For seconds after a preemption, sacct's newest (only) line is PREEMPTED with an end
    time while the controller already requeues the job: the controller's live record wins."""
    squeue = _SQUEUE.format(id=248, state=state, reason=reason, code=0, restarts=1, nodes=nodes)
    asked = []

    def run(argv):
        asked.append(argv[0])
        return _answers(squeue, _PREEMPTED_RUN)(argv)

    snap = run_sync(resolve_states(["248"]), run)["248"]
    assert asked == ["squeue"]
    assert snap.state.state is SlurmState(state) and not snap.state.is_terminal
    assert snap.state.restarts == 1
    # The key lookup (exactly-once, retries) merges both views the same way.
    from slurmflow.status import lookup_key

    found = run_sync(lookup_key(["pre-job2.sh"]), _answers(squeue, _PREEMPTED_RUN))
    assert found["248"].state.state is SlurmState(state) and not found["248"].state.is_terminal


def test_an_earlier_preempted_run_is_history():
    snap = run_sync(resolve_states(["248"]), _answers(None, f"{_PREEMPTED_RUN}\n{_REQUEUED_RUN}"))["248"]
    assert snap.state.state is SlurmState.RUNNING and snap.state.restarts == 1 and not snap.state.is_terminal


def test_preempted_with_preemptmode_cancel_ends_the_job():
    """PreemptMode=CANCEL: the controller shows PREEMPTED (it never does for a job it requeues)
    until MinJobAge, then only sacct knows the job, PREEMPTED with an end time: ended both ways."""
    sacct = ("250|250|pre-job2.sh|PREEMPTED|0:0|00:00:05|5|local1|None|2026-12-02T01:12:41|"
             "2026-12-02T01:12:41|2026-12-02T01:12:46")
    in_memory = _SQUEUE.format(id=250, state="PREEMPTED", reason="None", code=9, restarts=0, nodes="local1")
    for squeue in (in_memory, None):
        snap = run_sync(resolve_states(["250"]), _answers(squeue, sacct))["250"]
        assert snap.state.state is SlurmState.PREEMPTED and snap.state.ended and snap.state.is_terminal
        assert snap.final and snap.source == "sacct" and snap.end == "2026-12-02T01:12:46"
        assert JobSnapshot.from_dict(snap.to_dict()) == snap
    # Without accounting the controller's record is the answer, ended as well.
    from slurmflow.parsing import parse_squeue

    assert parse_squeue(in_memory + "\n")[0].state.is_terminal


def test_an_array_task_that_ended_preempted_fails_the_array_and_a_requeued_one_does_not():
    squeue = "\n".join([
        "300_0|300|0|sweep|COMPLETED|None|0|0|local1|0:05|",
        "300_1|300|1|sweep|PENDING|BeginTime|0|1||0:00|",
    ])
    sacct_only_preempted = ("300_1|300|sweep|PREEMPTED|0:0|00:00:05|5|local1|None|2026-12-02T01:00:00|"
                            "2026-12-02T01:00:01|2026-12-02T01:00:06")
    opts = ResolveOptions(expected_tasks={"300": 2})
    snap = run_sync(resolve_states(["300"], opts), _answers(squeue, sacct_only_preempted))["300"]
    assert snap.state.state is SlurmState.PENDING and not snap.state.is_terminal and snap.state.restarts == 1
    # Task 1 left the controller preempted (PreemptMode=CANCEL): the array is over, and failed.
    gone = "300_0|300|0|sweep|COMPLETED|None|0|0|local1|0:05|"
    snap = run_sync(resolve_states(["300"], opts), _answers(gone, sacct_only_preempted))["300"]
    assert snap.state.state is SlurmState.PREEMPTED and snap.state.is_terminal and snap.final
    assert snap.progress.failed_tasks == (1,) and snap.first_failed_task == 1
