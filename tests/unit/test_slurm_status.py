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
