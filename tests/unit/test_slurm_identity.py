"""The exactly-once key: names, generations, job directories and the attach/reuse/submit rule."""

from __future__ import annotations

from slurmflow.identity import (
    MAX_LOOKBACK_GENERATIONS,
    ExistingJob,
    JobKey,
    decide,
    generation_of,
    parse_job_name,
    safe_path_component,
)
from slurmflow.states import SlurmState

KEY = JobKey("train", "manual__2024-05-01T00:00:00+00:00", "fit", -1)


def test_key_is_deterministic_and_distinct():
    assert KEY.digest == JobKey("train", "manual__2024-05-01T00:00:00+00:00", "fit").digest
    others = [
        JobKey("train", "manual__2024-05-01T00:00:00+00:00", "fit", 0),
        JobKey("train", "manual__2024-05-02T00:00:00+00:00", "fit"),
        JobKey("train2", "manual__2024-05-01T00:00:00+00:00", "fit"),
        JobKey("train", "manual__2024-05-01T00:00:00+00:00", "fit2"),
    ]
    assert len({KEY.digest, *(k.digest for k in others)}) == 5


def test_job_name_round_trip():
    name = KEY.job_name(3)
    assert name == f"fit.{KEY.digest}.g3"
    assert parse_job_name(name) == (KEY.digest, 3)
    assert KEY.owns(name)
    assert not JobKey("x", "y", "fit").owns(name)
    assert parse_job_name("wrap") is None


def test_candidate_names_newest_first_and_bounded():
    assert KEY.candidate_names(2) == [KEY.job_name(2), KEY.job_name(1), KEY.job_name(0)]
    assert len(KEY.candidate_names(500)) == MAX_LOOKBACK_GENERATIONS


def test_job_dir_is_safe_and_per_generation():
    assert KEY.job_dir("/home/u/jobs/", 0) == "/home/u/jobs/train/manual__2024-05-01T00_00_00_00_00/fit/g0"
    assert JobKey("d", "r", "t", 4).job_dir("/j", 2) == "/j/d/r/t.m4/g2"
    assert safe_path_component("..") == "_"
    assert safe_path_component("$(touch x); rm -rf /") == "_touch_x_rm_-rf_"


def test_generation_counts_clears_not_retries():
    # retries=2: tries 1..3 share max_tries=2 -> generation 0; a clear after try 3 sets
    # max_tries = 3 + 2 = 5 -> generation 3 for tries 4..6.
    assert generation_of(2, 2) == 0
    assert generation_of(5, 2) == 3
    assert generation_of(0, 0) == 0
    assert generation_of(None, None) == 0


def job(job_id, gen, state):
    return ExistingJob(str(job_id), gen, SlurmState(state))


def test_decide_submits_when_nothing_exists():
    decision = decide(0, [])
    assert decision.action == "submit" and decision.cancel == ()


def test_decide_attaches_to_live_job_of_this_generation():
    decision = decide(0, [job(10, 0, "FAILED"), job(11, 0, "RUNNING")])
    assert (decision.action, decision.job_id) == ("attach", "11")


def test_decide_reuses_completed_job():
    decision = decide(0, [job(10, 0, "FAILED"), job(11, 0, "COMPLETED")])
    assert (decision.action, decision.job_id) == ("reuse", "11")


def test_decide_resubmits_after_failure():
    decision = decide(0, [job(10, 0, "COMPLETED"), job(11, 0, "NODE_FAIL")])
    assert decision.action == "submit"


def test_decide_clear_cancels_old_generation_and_ignores_its_success():
    decision = decide(1, [job(10, 0, "COMPLETED"), job(11, 0, "RUNNING")])
    assert decision.action == "submit"
    assert decision.cancel == ("11",)


def test_decide_never_keeps_two_live_jobs():
    decision = decide(0, [job(10, 0, "PENDING"), job(11, 0, "RUNNING")])
    assert (decision.action, decision.job_id, decision.cancel) == ("attach", "11", ("10",))


def test_requeued_counts_as_live():
    assert decide(0, [job(10, 0, "REQUEUED")]).action == "attach"


def test_a_preempted_job_is_live_until_it_is_known_to_have_ended():
    from slurmflow.states import JobState

    assert decide(0, [job(10, 0, "PREEMPTED")]).action == "attach"  # Slurm may requeue it
    ended = ExistingJob("10", 0, JobState(SlurmState.PREEMPTED, ended=True))  # PreemptMode=CANCEL
    decision = decide(0, [ended])
    assert decision.action == "submit" and "ended PREEMPTED" in decision.reason


def test_one_identity_names_job_dir_run_key_and_survives_xcom():
    from slurmflow.identity import JobIdentity

    key = JobKey("train_model", "manual__2026-01-01T00:00:00+00:00", "train")
    first, cleared = JobIdentity(key, 0), JobIdentity(key, 1)
    assert first.job_name == key.job_name(0) and cleared.job_name == key.job_name(1)
    assert first.job_dir("/jobs").endswith("/train/g0") and cleared.job_dir("/jobs").endswith("/train/g1")
    assert first.run_key == "train_model/manual__2026-01-01T00:00:00+00:00/train/-1/g0"
    assert first.run_key != cleared.run_key  # a clear is a new MLflow run, version and catalog document
    assert first.trial_key(3) == f"{first.run_key}/trial-3"
    assert JobIdentity.from_dict(cleared.as_dict()) == cleared
    # the digest (Slurm lookups across generations) ignores the generation
    assert first.job_name.split(".")[1] == cleared.job_name.split(".")[1]
