"""The pure parts of the chaos harness (scripts/chaos): the fault table, phase detection, when a
run counts as recovered, the line and secret checks, and the figures rendered into
docs/RELIABILITY.md. The harness itself runs against the real stack (``make chaos``)."""

from __future__ import annotations

import random

import pytest

from scripts.chaos.__main__ import broken, parse_args
from scripts.chaos.inject import may_change
from scripts.chaos.observe import (
    duplicate_jobs,
    duplicate_registrations,
    find_secrets,
    key_jobs,
    line_diff,
    secret_values,
    steps_redone,
)
from scripts.chaos.phases import Sample, detect_phase, in_phase, progressed, recovery_s
from scripts.chaos.report import BEGIN, END, render_generated, render_table, summarise, update_doc
from scripts.chaos.table import FAULTS, NOT_COVERED, PHASES, TrialSpec, plan, select_faults
from scripts.localstack.services import services

# --- the fault table -------------------------------------------------------------------------------


def test_every_fault_names_real_phases_and_real_programs():
    programs = {s.name for s in services()}
    for fault in FAULTS.values():
        assert fault.phases and set(fault.phases) <= set(PHASES), fault.name
        assert fault.promise.strip(), fault.name
        if fault.kind in {"kill_tree", "outage", "restart", "node_fail"}:
            assert fault.target in programs, f"{fault.name}: no supervisord program {fault.target!r}"
        if fault.kind in {"outage", "node_fail", "preempt"}:
            low, high = fault.outage
            assert 0 < low <= high
        else:
            assert fault.outage is None


def test_every_fault_and_phase_of_issue_11_is_in_the_table():
    pairs = {(f.name, p) for f in FAULTS.values() for p in f.phases}
    for component in ("triggerer", "scheduler", "dag-processor", "api-server"):
        assert {(f"kill-{component}", p) for p in ("submit", "deferred", "register")} <= pairs
    assert {("kill-task", "submit"), ("kill-task", "register"), ("kill-task", "catalog"),
            ("stop-sshd", "submit"), ("stop-sshd", "deferred"),
            ("restart-slurmctld", "deferred"), ("restart-slurmctld", "job-end"),
            ("stop-slurmdbd", "deferred"), ("stop-slurmdbd", "job-end"),
            ("kill-slurmd", "running"), ("preempt", "running"), ("stop-mlflow", "register"),
            ("stop-mlflow", "evaluate"),
            ("stop-mongo", "catalog"), ("stop-mongo", "job-start"), ("stop-registry", "build"),
            ("second-run", "deferred"), ("clear", "deferred")} <= pairs
    assert FAULTS["stop-sshd"].outage == (15.0, 180.0)
    assert FAULTS["stop-mlflow"].outage == FAULTS["stop-mongo"].outage == (30.0, 120.0)
    assert FAULTS["stop-slurmdbd"].outage == (60.0, 60.0) and FAULTS["preempt"].outage == (1, 3)
    # the node stays down past SlurmdTimeout (60 s in include/stack/slurm.conf): NODE_FAIL
    assert FAULTS["kill-slurmd"].outage[0] > 60
    assert FAULTS["kill-task"].sbatch_anchor
    # MLflow at the nightly evaluate/promote: the nightly DAG's own run is driven
    assert PHASES["evaluate"].dag == "nightly_retrain" and PHASES["evaluate"].task_id == "evaluate_and_promote"
    assert {p.dag for p in PHASES.values()} == {"train_model", "nightly_retrain"}


def test_plan_interleaves_rounds_so_a_cut_short_run_covers_every_pair():
    specs = plan(select_faults(["kill-triggerer", "stop-sshd"]), trials=3)
    assert [(s.fault.name, s.phase.name, s.index) for s in specs[:6]] == [
        ("kill-triggerer", "submit", 0), ("kill-triggerer", "deferred", 0), ("kill-triggerer", "register", 0),
        ("stop-sshd", "submit", 0), ("stop-sshd", "deferred", 0), ("kill-triggerer", "submit", 1)]
    assert len(specs) == 15 and specs[-1].index == 2


def test_smoke_is_one_trial_of_each_pair():
    args = parse_args(["--smoke"])
    assert args.trials == 1 and args.orphan_wait == 60
    assert len(plan(select_faults([]), args.trials)) == sum(len(f.phases) for f in FAULTS.values()) == 32
    assert parse_args([]).orphan_wait == 300 and parse_args([]).trials == 10


def test_unknown_fault_or_phase_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown fault.*kill-scheduler"):
        select_faults(["kill-everything"])
    with pytest.raises(ValueError, match="unknown phase.*deferred"):
        plan(select_faults([]), 1, ["job_end"])
    assert {s.phase.name for s in plan(select_faults([]), 1, ["deferred"])} == {"deferred"}


def test_delays_are_drawn_inside_the_window():
    rng = random.Random(1)
    submit = TrialSpec(FAULTS["kill-scheduler"], PHASES["submit"], 0)
    at_sbatch = TrialSpec(FAULTS["kill-task"], PHASES["submit"], 0)
    sshd = TrialSpec(FAULTS["stop-sshd"], PHASES["deferred"], 0)
    for _ in range(200):
        assert 0.0 <= submit.delay(rng) <= 0.5
        assert 0.0 <= at_sbatch.delay(rng) <= 1.0
        assert 15.0 <= sshd.outage(rng) <= 180.0
        assert TrialSpec(FAULTS["preempt"], PHASES["running"], 0).outage(rng) in (1.0, 2.0, 3.0)
    assert submit.outage(rng) is None
    assert at_sbatch.anchor == "sbatch" and TrialSpec(FAULTS["kill-task"], PHASES["register"], 0).anchor == "state"
    assert TrialSpec(FAULTS["kill-slurmd"], PHASES["running"], 0).anchor == "training"


# --- phases and recovery ---------------------------------------------------------------------------

RUNNING_TRAIN = {"build_image": ("success", 1), "train": ("running", 1), "register": (None, 0)}


@pytest.mark.parametrize(("tasks", "run_state", "phase"), [
    ({"build_image": ("running", 1), "train": (None, 0)}, "running", "build"),
    ({"preflight": ("running", 1), "build_image": (None, 0)}, "running", "before"),
    (RUNNING_TRAIN, "running", "submit"),
    ({"train": ("deferred", 1)}, "running", "deferred"),
    ({"train": ("success", 1), "register": ("running", 1), "reap": ("running", 1)}, "running", "register"),
    # catalog is scheduled while register finishes: the later phase wins
    ({"register": ("running", 1), "catalog": ("scheduled", 1)}, "running", "catalog"),
    ({"train": ("up_for_retry", 1)}, "running", "before"),
    (None, None, "unknown"),
    ({"catalog": ("success", 1)}, "success", "done"),
])
def test_detect_phase(tasks, run_state, phase):
    assert detect_phase(tasks, run_state) == phase


def test_in_phase_needs_the_phase_task_in_one_of_its_states():
    assert in_phase(PHASES["submit"], RUNNING_TRAIN)
    assert not in_phase(PHASES["deferred"], RUNNING_TRAIN)
    assert not in_phase(PHASES["catalog"], None)


def s(t, run="running", records=0, **tasks):
    return Sample(t=t, tasks=tasks or None, trigger_records=records, run_state=run)


def test_recovery_after_a_scheduler_kill_waits_for_the_next_try_to_run():
    # the task is a zombie ("running", try 1) until the heartbeat timeout fails it; up_for_retry
    # and queued are not progress; running on try 2 is
    samples = [s(0, train=("running", 1)), s(1, train=("running", 1)), s(3, train=("running", 1)),
               s(35, train=("up_for_retry", 1)), s(66, train=("queued", 2)), s(67, train=("running", 2))]
    assert recovery_s(samples, injected_at=0.5, fault_over_at=3) == 66.5


def test_recovery_counts_only_progress_after_the_fault_is_over():
    # trigger records grow while the scheduler is down (the trigger does not need it)
    samples = [s(0, records=3, train=("deferred", 1)), s(1, records=5, train=("deferred", 1)),
               s(4, records=5, train=("deferred", 1)), s(5, records=6, train=("deferred", 1))]
    assert recovery_s(samples, injected_at=0, fault_over_at=3) == 5


def test_recovery_bridges_the_gap_while_the_api_server_is_down():
    samples = [s(0, train=("deferred", 1)), Sample(t=2, tasks=None, run_state=None),
               Sample(t=9, tasks=None, run_state=None), s(12, train=("success", 1), register=("running", 1))]
    assert recovery_s(samples, injected_at=1, fault_over_at=10) == 11


def test_no_progress_means_no_recovery():
    samples = [s(0, train=("running", 1)), s(5, train=("failed", 1))]
    assert recovery_s(samples, 0, 1) is None
    assert not progressed(samples[0], samples[1])
    assert progressed(samples[1], s(6, run="failed", train=("failed", 1)))  # the run ended


def test_a_killed_tasks_recovery_is_its_own_retry_not_a_task_beside_it():
    """Regression (kill-task at register): reap succeeded 0.02 s after register was killed and
    counted as the recovery; register ran again on its second try 30 s later."""
    samples = [Sample(0, {"register": ("running", 1), "reap": ("running", 1)}),
               Sample(1, {"register": ("running", 1), "reap": ("success", 1)}),
               Sample(30, {"register": ("up_for_retry", 1), "reap": ("success", 1)}),
               Sample(61, {"register": ("running", 2), "reap": ("success", 1)}, trigger_records=9)]
    assert recovery_s(samples, injected_at=0.5, fault_over_at=0.5) == 0.5
    assert recovery_s(samples, injected_at=0.5, fault_over_at=0.5, task="register") == 60.5


# --- lines, jobs, secrets --------------------------------------------------------------------------


def test_line_diff_exact_duplicated_and_missing():
    log = ["a", "b\r", "c"]
    assert line_diff(["a", "b", "c"], log) == {"streamed": 3, "job_log": 3, "exact": True,
                                               "duplicated": 0, "missing": 0}
    twice = line_diff(["a", "b", "b", "c"], log)
    assert twice["duplicated"] == 1 and twice["missing"] == 0 and not twice["exact"]
    held_back = line_diff(["a"], log)
    assert held_back["missing"] == 2 and held_back["duplicated"] == 0


def test_a_line_the_masker_changed_is_neither_duplicated_nor_missing():
    log = ["start", "RuntimeError: MongoDB mongodb://db:27017/x unreachable", "end"]
    shown = ["start", "RuntimeError: MongoDB *** unreachable", "end"]
    assert line_diff(shown, log) == {"streamed": 3, "job_log": 3, "exact": True, "duplicated": 0, "missing": 0}
    assert line_diff(["start", "*** other", "end"], log)["missing"] == 1


def test_key_jobs_filters_by_digest_any_generation_newest_line_wins():
    lines = ["101|train.abcdef012345.g0|PREEMPTED|2026-12-02T10:00:00|2026-12-02T10:01:00",
             "101|train.abcdef012345.g0|COMPLETED|2026-12-02T10:01:05|2026-12-02T10:02:00",
             "102|train.ffffffffffff.g0|RUNNING|2026-12-02T10:00:00|Unknown",
             "103_2|train.abcdef012345.g1|CANCELLED by 0|2026-12-02T10:03:00|Unknown", "junk"]
    assert key_jobs(lines, "abcdef012345") == {
        "101": {"name": "train.abcdef012345.g0", "generation": 0, "state": "COMPLETED",
                "submit": "2026-12-02T10:01:05", "end": "2026-12-02T10:02:00"},
        "103": {"name": "train.abcdef012345.g1", "generation": 1, "state": "CANCELLED",
                "submit": "2026-12-02T10:03:00", "end": None}}


def _job(gen, state, submit, end):
    return {"generation": gen, "state": state, "submit": f"2026-12-02T10:{submit}", "end": end and f"2026-12-02T10:{end}"}


@pytest.mark.parametrize(("jobs", "dups"), [
    # one job, requeued or not: nothing to say
    ({"1": _job(0, "COMPLETED", "00:00", "05:00")}, []),
    # a retry after the first job failed, and a retrain after a clear once the first was cancelled
    ({"1": _job(0, "FAILED", "00:00", "01:00"), "2": _job(0, "COMPLETED", "01:30", "03:00")}, []),
    ({"1": _job(0, "CANCELLED", "00:00", "01:00"), "2": _job(1, "COMPLETED", "01:00", "03:00")}, []),
    # a second job while the first still ran (ended later, or still running)
    ({"1": _job(0, "COMPLETED", "00:00", "05:00"), "2": _job(0, "COMPLETED", "01:00", "06:00")}, ["2"]),
    ({"1": _job(0, "RUNNING", "00:00", None), "2": _job(1, "RUNNING", "01:00", None)}, ["2"]),
    # a resubmission after the same generation had completed (its result was to be reused)
    ({"1": _job(0, "COMPLETED", "00:00", "01:00"), "2": _job(0, "COMPLETED", "02:00", "03:00")}, ["2"]),
])
def test_duplicate_jobs_are_overlaps_and_resubmissions_of_a_completed_generation(jobs, dups):
    assert duplicate_jobs(jobs) == dups


def test_steps_redone_per_attempt_and_unknown_after_a_kill():
    rows = [{"restart": 0, "start_step": 0, "end_step": 40, "status": "preempted"},
            {"restart": 1, "start_step": 40, "end_step": None, "status": "running"},  # killed with its node
            {"restart": 2, "start_step": 60, "end_step": 100, "status": "completed"}]
    assert steps_redone(rows) == {"attempts": 3, "steps_redone": 0, "attempts_unknown": 1}
    rows[1].update(end_step=75, status="preempted")
    assert steps_redone(rows)["steps_redone"] == 15


def test_duplicate_registrations_count_beyond_one_per_generation():
    assert duplicate_registrations({"mlflow_runs": {"0": 1, "1": 1}, "model_versions": 2, "catalog_docs": {"0": 1}}) == 0
    assert duplicate_registrations({"mlflow_runs": {"0": 2}, "model_versions": 3, "catalog_docs": {"0": 2}}) == 4


def test_secrets_are_reported_by_name_never_by_value():
    secrets = {"MLFLOW_TRACKING_PASSWORD": "hunter2-long", "REGISTRY_PASSWORD": "s3cr3t-value"}
    texts = {"train/attempt=1.log": "login ok, password=hunter2-long", "register/attempt=1.log": "***"}
    found = find_secrets(texts, secrets)
    assert found == [{"secret": "MLFLOW_TRACKING_PASSWORD", "where": "train/attempt=1.log"}]
    assert "hunter2" not in repr(found)


def test_secret_values_are_the_generated_ones_and_the_passwords(tmp_path):
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text("PG_AIRFLOW_PASSWORD=generated-value\nSHORT=abc\n")
    values = secret_values({"AIRFLOW_PASSWORD": "admin", "MLFLOW_TRACKING_PASSWORD": "long-enough",
                            "SSH_PORT": "2222"}, secrets_file)
    assert sorted(values) == ["MLFLOW_TRACKING_PASSWORD", "PG_AIRFLOW_PASSWORD"]  # the masker skips "abc"


# --- figures and the document ----------------------------------------------------------------------


def trial(fault="kill-triggerer", phase="deferred", **kw):
    base = {"fault": fault, "phase": phase, "run_id": "r", "outcome": "success", "duplicates": 0,
            "orphans": [], "lost": False, "lines": {"duplicated": 0, "missing": 0}, "secrets_found": [],
            "phase_hit": True, "recovery_s": 10.0, "started_at": "2026-12-02T02:40:00+00:00"}
    return {**base, **kw}


def test_summarise_counts_and_recovery_percentiles():
    trials = [trial(recovery_s=4.0), trial(recovery_s=10.0), trial(recovery_s=30.0, duplicates=1, orphans=None),
              trial(outcome="lost", lost=True, recovery_s=None, lines={"duplicated": 2}),
              trial("stop-sshd", secrets_found=[{"secret": "X", "where": "log"}]),
              trial("kill-scheduler", "submit")]
    rows = summarise(trials)
    assert [(r.fault, r.phase) for r in rows] == [("kill-scheduler", "submit"), ("kill-triggerer", "deferred"),
                                                  ("stop-sshd", "deferred")]
    row = rows[1]
    assert (row.trials, row.successes, row.duplicates, row.lost, row.duplicated_lines) == (4, 3, 1, 1, 2)
    assert (row.orphans, row.orphans_unchecked) == (0, 1)
    assert (row.p50, row.max) == (10.0, 30.0)
    assert rows[2].secrets == 1
    table = render_table(rows)
    assert "| kill-triggerer | deferred | 4 | 3 | 1 | 0 (1 unchecked) | 1 | 2 | 0 | 4 | 10 / 30 |" in table
    assert table.splitlines()[0].startswith("| fault | phase | trials | successes | duplicate jobs | orphans | lost")


def test_a_pair_without_recovery_figures_shows_a_dash():
    (row,) = summarise([trial(recovery_s=None)])
    assert render_table([row]).endswith("| - / - |")


def test_the_document_keeps_its_hand_written_parts():
    generated = render_generated({"trials": [trial()]})
    assert generated.startswith(BEGIN) and generated.endswith(END)
    assert "1 trials, 2026-12-02T02:40:00+00:00" in generated
    assert "### Not covered yet" in generated and NOT_COVERED[0] in generated
    assert all(f"**{name}**" in generated for name in FAULTS)
    doc = f"# Reliability\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Defects found\n\nnone\n"
    new = update_doc(doc, generated)
    assert "old table" not in new and "intro" in new and new.endswith("## Defects found\n\nnone\n")
    assert update_doc("# Reliability\n", generated) == f"# Reliability\n\n{generated}\n"


def test_broken_lists_every_promise_a_trial_broke():
    assert broken(trial()) == []
    bad = trial(outcome="failed", duplicates=1, orphans=[{"job_id": "7"}], lines={"duplicated": 1, "missing": 0},
                secrets_found=[{"secret": "X", "where": "train/attempt=1.log"}])
    assert broken(bad) == ["run failed", "1 duplicate job(s)", "1 orphan(s)", "1 duplicated line(s)",
                           "secret(s) in train/attempt=1.log"]


def test_trials_the_harness_failed_are_left_out_of_the_figures():
    results = {"trials": [trial(), {**trial(), "outcome": "harness-error", "error": "Traceback..."}]}
    (row,) = summarise(results["trials"])
    assert row.trials == 1
    assert "1 trial(s) the harness itself failed are left out" in render_generated(results)


def test_task_process_is_found_by_the_title_airflows_task_runner_sets():
    import subprocess
    import sys
    import time

    from scripts.chaos.inject import task_process

    ti_id = "01a2348a-d21e-7b85-94aa-000000000000"
    child = subprocess.Popen([sys.executable, "-c", "import setproctitle, time; "
                              f"setproctitle.setproctitle('airflow worker -- {ti_id}'); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while task_process(ti_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert task_process(ti_id) == child.pid
        assert task_process(ti_id[:-1] + "1") is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("cmdline, again", [
    (b"sshd: hpcuser@notty\0", True),  # sshd's session child before it execs the remote command
    (b"", True),  # mid-exec
    (b"airflow worker -- LocalExecutor: <idle>\0", True),  # retitles itself per task
    (b"bash\0-c\0sh -c 'exec 9>>.slurmflow-submit.lock'\0", False),
    (b"/usr/bin/sleep\0" b"30\0", False),
])
def test_freeze_at_looks_again_at_processes_that_may_still_exec_or_retitle(cmdline, again):
    """Regression (CI): marking sshd's session child seen at its first look, before it exec'd the
    submission under the same pid, made the kill-task@submit trial miss the sbatch anchor."""
    assert may_change(cmdline) is again


def test_an_appended_run_fills_the_least_covered_pairs_first():
    from scripts.chaos.table import FAULTS, fewest_first, plan

    specs = plan([FAULTS["kill-triggerer"], FAULTS["stop-sshd"]], 2)
    done = [{"fault": "kill-triggerer", "phase": "submit", "phase_hit": True}] * 2 + \
           [{"fault": "stop-sshd", "phase": "submit", "phase_hit": False}]  # missed its phase: not counted
    order = [(s.fault.name, s.phase.name, s.index) for s in fewest_first(specs, done)]
    assert order[0][:2] != ("kill-triggerer", "submit")
    assert order[-2:] == [("kill-triggerer", "submit", 0), ("kill-triggerer", "submit", 1)]
    assert sorted(order) == sorted((s.fault.name, s.phase.name, s.index) for s in specs)  # nothing lost
