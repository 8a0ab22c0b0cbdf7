"""SlurmSubmitJobOperator and SlurmJobSensor with a fake login node (no Airflow DB needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException
from airflow.sdk.exceptions import TaskDeferred

from slurmflow.errors import SlurmConnectionError
from slurmflow.operators.slurm import XCOM_JOB_KEY, SlurmSubmitJobOperator
from slurmflow.sensors.slurm import SlurmJobSensor
from slurmflow.triggers.slurm import SlurmJobTrigger
from tests.unit.fixtures.slurm.fakes import FakeCluster, fake_hook


class FakeTI:
    def __init__(self, try_number=1, max_tries=0, map_index=-1):
        self.dag_id, self.run_id, self.task_id, self.map_index = "dag", "manual__1", "train", map_index
        self.try_number, self.max_tries = try_number, max_tries
        self.xcom: dict = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value

    def xcom_pull(self, task_ids=None, key=None, map_indexes=None):
        return self.xcom.get(key)


def make(cluster, **kw):
    kw.setdefault("command", "python -m hpctrain fit")
    kw.setdefault("sbatch_options", {"account": "research", "time": "10"})
    op = SlurmSubmitJobOperator(task_id="train", **kw)
    op.__dict__["hook"] = fake_hook(cluster)
    return op


def run(op, ti=None):
    ti = ti or FakeTI()
    ctx = {"ti": ti}
    op.render_template_fields(ctx)
    return ctx, ti


def test_renders_the_script_as_a_template_field_with_secrets_masked():
    cluster = FakeCluster()
    op = make(cluster, secret_environment={"TOKEN": "{{ 'sec' + 'ret-42' }}"}, environment={"EPOCHS": "{{ 1 + 2 }}"})
    assert "sbatch_script" in op.template_fields
    run(op)
    assert "#SBATCH --job-name=train." in op.sbatch_script
    assert "export EPOCHS=3" in op.sbatch_script
    assert "secret-42" not in op.sbatch_script
    assert op.secret_environment == {"TOKEN": "secret-42"}
    from airflow.sdk._shared.secrets_masker import redact

    assert "secret-42" not in str(redact(op.secret_environment))


def test_defers_to_the_trigger_after_exactly_once_submission():
    cluster = FakeCluster()
    op = make(cluster)
    ctx, ti = run(op)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    trigger = deferred.value.trigger
    assert isinstance(trigger, SlurmJobTrigger) and deferred.value.method_name == "execute_complete"
    job = ti.xcom[XCOM_JOB_KEY]
    assert trigger.job_id == job["job_id"] and trigger.cancel_on_kill
    assert job["log_path"] == f"{job['job_dir']}/slurm-{job['job_id']}.out"
    assert job["job_dir"] == "/home/u/jobs/dag/manual__1/train/g0"
    assert deferred.value.kwargs == {"job": job}
    assert len(cluster.jobs) == 1
    # a success ends the task in the triggerer, with the same record and the file to delete
    cleanup = [job["secrets_path"]] if job.get("secrets_path") else []
    assert trigger.finish == {"job": job, "cleanup": cleanup}


def test_retry_reattaches_and_clear_starts_a_new_generation():
    cluster = FakeCluster()
    op = make(cluster, retries=2)
    ctx, ti = run(op, FakeTI(try_number=1, max_tries=2))
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    first = ti.xcom[XCOM_JOB_KEY]["job_id"]
    # Automatic retry (same max_tries): the live job is re-attached.
    op2 = make(cluster, retries=2)
    op2.__dict__["hook"] = fake_hook(cluster)
    ctx2, ti2 = run(op2, FakeTI(try_number=2, max_tries=2))
    with pytest.raises(TaskDeferred):
        op2.execute(ctx2)
    assert ti2.xcom[XCOM_JOB_KEY]["job_id"] == first and ti2.xcom[XCOM_JOB_KEY]["action"] == "attached"
    # Manual clear after try 2: max_tries = 2 + retries -> generation 2, old job cancelled.
    op3 = make(cluster, retries=2)
    ctx3, ti3 = run(op3, FakeTI(try_number=3, max_tries=4))
    with pytest.raises(TaskDeferred):
        op3.execute(ctx3)
    assert ti3.xcom[XCOM_JOB_KEY]["job_id"] != first
    assert ti3.xcom[XCOM_JOB_KEY]["generation"] == 2
    assert cluster.jobs[first].state == "CANCELLED"
    # The identity travels with the job: the run key names generation 2, the first try's g0.
    assert ti.xcom[XCOM_JOB_KEY]["run_key"] == "dag/manual__1/train/-1/g0"
    assert ti3.xcom[XCOM_JOB_KEY]["run_key"] == "dag/manual__1/train/-1/g2"
    assert ti3.xcom[XCOM_JOB_KEY]["identity"]["generation"] == 2


def test_the_result_of_a_finished_job_carries_its_identity():
    """register reads the train task's *return value*: it must name the same training."""
    cluster = FakeCluster()
    op = make(cluster)
    from slurmflow.identity import JobKey

    cluster.add_job(JobKey("dag", "manual__1", "train").job_name(0), "COMPLETED")
    ctx, ti = run(op)
    result = op.execute(ctx)
    assert result["identity"] == ti.xcom[XCOM_JOB_KEY]["identity"]
    assert result["run_key"] == "dag/manual__1/train/-1/g0"


def test_completed_job_is_reused_without_deferring():
    cluster = FakeCluster()
    op = make(cluster)
    from slurmflow.identity import JobKey

    done = cluster.add_job(JobKey("dag", "manual__1", "train").job_name(0), "COMPLETED")
    ctx, ti = run(op)
    result = op.execute(ctx)
    assert result["job_id"] == done.job_id and result["state"] == "COMPLETED" and result["action"] == "reused"


def test_a_reused_job_shows_its_log_in_the_task_log(tmp_path, capfd):
    """Regression (make chaos, kill-task at submit): the retry of a task killed right after sbatch
    found the job COMPLETED and reported it without one line of its log."""
    from slurmflow.identity import JobKey

    cluster = FakeCluster()
    op = make(cluster)
    op.__dict__["hook"] = fake_hook(cluster, job_root=str(tmp_path))
    done = cluster.add_job(JobKey("dag", "manual__1", "train").job_name(0), "COMPLETED")
    ctx, _ = run(op)
    log = Path(op._script.job_dir) / f"slurm-{done.job_id}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("epoch 0 loss 0.5\nepoch 1 loss 0.25\n")
    capfd.readouterr()
    assert op.execute(ctx)["action"] == "reused"
    out = "".join(capfd.readouterr())  # the task logger (structlog) writes to the console here
    assert out.count(f"[slurm {done.job_id}] epoch 0 loss 0.5") == 1
    assert out.count(f"[slurm {done.job_id}] epoch 1 loss 0.25") == 1


def event(status, state="COMPLETED", exit_code=0, tail="", message=""):
    return {
        "status": status,
        "job_id": "100",
        "message": message,
        "log_tail": tail,
        "snapshot": {"job_id": "100", "job_name": "train.x.g0", "state": state, "reason": "", "exit_code": exit_code,
                     "signal": 0, "restarts": 1, "elapsed_seconds": 65, "node_list": "n1", "tasks": {}, "final": True},
    }


JOB = {"job_id": "100", "job_name": "train.x.g0", "job_dir": "/j", "log_path": "/j/slurm-100.out",
       "script_path": "/j/job.sbatch", "secrets_path": None, "cluster": "slurm_default", "action": "submitted",
       "generation": 0}


def test_execute_complete_success_returns_the_result_dict():
    op = make(FakeCluster())
    result = op.execute_complete({"ti": FakeTI()}, event("success"), job=JOB)
    assert {k: result[k] for k in ("job_id", "state", "exit_code", "elapsed", "node_list", "job_dir", "log_path", "restarts")} == {
        "job_id": "100", "state": "COMPLETED", "exit_code": 0, "elapsed": "00:01:05", "node_list": "n1",
        "job_dir": "/j", "log_path": "/j/slurm-100.out", "restarts": 1,
    }


def test_failure_fails_without_retry_and_quotes_the_tail():
    op = make(FakeCluster())
    with pytest.raises(AirflowFailException) as err:
        op.execute_complete({"ti": FakeTI()}, event("failed", "OUT_OF_MEMORY", 137, tail="Killed"), job=JOB)
    assert "OUT_OF_MEMORY" in str(err.value) and "Killed" in str(err.value)


def test_a_sweep_piece_tolerates_failed_trials_and_lists_them():
    """A sweep's array ends with some trials failed: the piece succeeds (register decides how many
    failures are too many); without the option the same array fails the task."""
    tasks = {"0": {"state": "COMPLETED", "exit_code": 0}, "1": {"state": "FAILED", "exit_code": 1},
             "2": {"state": "COMPLETED", "exit_code": 0}}
    failed = event("failed", "FAILED", 1, tail="Traceback: boom")
    failed["snapshot"]["tasks"] = tasks
    result = make(FakeCluster(), tolerate_failed_array_tasks=True).execute_complete({"ti": FakeTI()}, failed, job=JOB)
    assert result["array"] == {"counts": {"COMPLETED": 2, "FAILED": 1}, "failed_tasks": [1], "total": 3}
    with pytest.raises(AirflowFailException, match="failed tasks \\[1\\]"):
        make(FakeCluster()).execute_complete({"ti": FakeTI()}, failed, job=JOB)


def test_retry_states_raise_a_retryable_exception():
    op = make(FakeCluster())
    with pytest.raises(AirflowException) as err:
        op.execute_complete({"ti": FakeTI()}, event("failed", "NODE_FAIL", 1), job=JOB)
    assert not isinstance(err.value, AirflowFailException)
    op = make(FakeCluster(), retry_states={"timeout"})
    with pytest.raises(AirflowException) as err:
        op.execute_complete({"ti": FakeTI()}, event("failed", "TIMEOUT", 0), job=JOB)
    assert not isinstance(err.value, AirflowFailException)


def test_timeout_cancels_the_job():
    cluster = FakeCluster()
    job = cluster.add_job("x", "RUNNING")
    op = make(cluster)
    with pytest.raises(AirflowException, match="cancelled"):
        op.execute_complete({"ti": FakeTI()}, event("timeout"), job={**JOB, "job_id": job.job_id})
    assert job.state == "CANCELLED"


def test_error_leaves_the_job_for_the_retry_but_cancels_on_the_last_try():
    cluster = FakeCluster()
    job = cluster.add_job("x", "RUNNING")
    op = make(cluster)
    err = {"status": "error", "message": "Connection refused", "snapshot": None}
    with pytest.raises(AirflowException, match="Connection refused"):
        op.execute_complete({"ti": FakeTI(try_number=1, max_tries=1)}, err, job={**JOB, "job_id": job.job_id})
    assert job.state == "RUNNING"
    with pytest.raises(AirflowException):
        op.execute_complete({"ti": FakeTI(try_number=2, max_tries=1)}, err, job={**JOB, "job_id": job.job_id})
    assert job.state == "CANCELLED"


def test_bad_input_fails_fast_with_the_valid_options():
    op = make(FakeCluster(), sbatch_options={"partiton": "debug"})
    with pytest.raises(AirflowFailException, match="valid options: .*partition"):
        run(op)


def test_rejected_submission_is_not_retried():
    cluster = FakeCluster()
    cluster.sbatch_error = (1, "sbatch: error: Batch job submission failed: Invalid partition name specified")
    op = make(cluster)
    ctx, _ = run(op)
    with pytest.raises(AirflowFailException, match="Invalid partition name"):
        op.execute(ctx)


def test_unreachable_cluster_is_retryable():
    cluster = FakeCluster()
    op = make(cluster)
    ctx, _ = run(op)
    op.hook.exec_bytes = lambda c, timeout=None: (_ for _ in ()).throw(SlurmConnectionError("Connection refused"))
    op.hook.submit_attempts = 1
    with pytest.raises(AirflowException, match="Connection refused") as err:
        op.execute(ctx)
    assert not isinstance(err.value, AirflowFailException)


def test_preflight_runs_test_only_before_submitting():
    cluster = FakeCluster()
    op = make(cluster, preflight=True)
    ctx, _ = run(op)
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    assert ["sbatch", "--test-only"] == cluster.calls[cluster.tools().index("sbatch")][:2]


def test_blocking_mode_waits_on_the_worker():
    cluster = FakeCluster()
    op = make(cluster, deferrable=False, poll_interval=0.01)
    ctx, ti = run(op)
    original = cluster._submit

    def submit_and_finish(argv):
        code, out, err = original(argv)
        for job in cluster.jobs.values():
            job.state = "COMPLETED"
        return code, out, err

    cluster._submit = submit_and_finish
    result = op.execute(ctx)
    assert result["state"] == "COMPLETED"


def test_on_kill_cancels_known_job_or_finds_it_by_key():
    cluster = FakeCluster()
    op = make(cluster)
    ctx, _ = run(op)
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    (job,) = cluster.jobs.values()
    op.on_kill()
    assert job.state == "CANCELLED"
    # Killed before the job id was known: the key lookup finds the live job.
    cluster2 = FakeCluster()
    op2 = make(cluster2)
    run(op2)
    live = cluster2.add_job(op2._identity.job_name, "RUNNING")
    op2.on_kill()
    assert live.state == "CANCELLED"


def test_resume_with_fail_cancels_the_job():
    cluster = FakeCluster()
    job = cluster.add_job("x", "RUNNING")
    op = make(cluster)
    ti = FakeTI()
    ti.xcom[XCOM_JOB_KEY] = {"job_id": job.job_id}
    with pytest.raises(AirflowException):
        op.resume_execution("__fail__", {"error": "Trigger failure"}, {"ti": ti})
    assert job.state == "CANCELLED"


def test_sensor_pokes_and_defers_without_cancel():
    cluster = FakeCluster()
    job = cluster.add_job("foreign", "RUNNING")
    sensor = SlurmJobSensor(task_id="wait", job_id=job.job_id, deferrable=False)
    sensor.__dict__["hook"] = fake_hook(cluster)
    assert sensor.poke({}) is False
    job.state = "COMPLETED"
    assert sensor.poke({}).xcom_value["state"] == "COMPLETED"
    job.state, job.exit_code = "FAILED", "2:0"
    with pytest.raises(AirflowFailException, match="FAILED"):
        sensor.poke({})
    deferring = SlurmJobSensor(task_id="wait2", job_id=job.job_id)
    with pytest.raises(TaskDeferred) as deferred:
        deferring.execute({})
    assert deferred.value.trigger.cancel_on_kill is False
    with pytest.raises(AirflowFailException, match="not a job id"):
        SlurmJobSensor(task_id="bad", job_id="1; rm -rf /").execute({})


def test_dry_run_shows_the_script_without_a_cluster():
    op = make(FakeCluster(), job_root="/scratch/jobs")
    text = op.preview_script()
    assert "#SBATCH --account=research" in text and "--chdir=/scratch/jobs/" in text
    op.dry_run()


def test_blocking_mode_fails_with_the_tail_and_streams_lines_once(tmp_path, capsys):
    cluster = FakeCluster()
    op = make(cluster, deferrable=False, poll_interval=0.01, job_root=str(tmp_path))
    op.__dict__["hook"] = fake_hook(cluster, job_root=str(tmp_path))
    ctx, ti = run(op)
    original = cluster._submit

    def submit_and_fail(argv):
        code, out, err = original(argv)
        (job,) = cluster.jobs.values()
        log = Path(argv[-2]).parent / f"slurm-{job.job_id}.out"  # argv[-2]: the script in the job dir
        log.parent.mkdir(parents=True)
        log.write_text("epoch 1\nTraceback: boom\n")
        job.state, job.exit_code = "FAILED", "1:0"
        return code, out, err

    cluster._submit = submit_and_fail
    with pytest.raises(AirflowFailException, match="Traceback: boom"):
        op.execute(ctx)
    streamed = re.findall(r"\[slurm \d+\] (.+?)\s+\[airflow", capsys.readouterr().out)  # the task log (structlog)
    assert streamed == ["epoch 1", "Traceback: boom"]


class FakeStateStore:
    """Airflow's task state store: what a sensor keeps between reschedule pokes."""

    def __init__(self):
        self.data: dict = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value, retention=None):
        self.data[key] = value


def test_sensor_in_reschedule_mode_remembers_how_long_the_job_has_been_missing(monkeypatch):
    """Each poke is a new sensor object (a new process): the missing clock lives in the store."""
    import slurmflow.sensors.slurm as sensor_mod

    cluster, store, clock = FakeCluster(), FakeStateStore(), [1000.0]
    monkeypatch.setattr(sensor_mod.time, "time", lambda: clock[0])

    def poke():
        sensor = SlurmJobSensor(task_id="wait", job_id="4242", deferrable=False, mode="reschedule", missing_grace=60)
        sensor.__dict__["hook"] = fake_hook(cluster)
        return sensor.poke({"task_state_store": store})

    assert poke() is False
    clock[0] += 59
    assert poke() is False
    clock[0] += 1
    with pytest.raises(AirflowFailException, match="4242 not found"):
        poke()


def test_a_slurm_older_than_supported_fails_the_task_without_retry():
    cluster = FakeCluster()
    op = make(cluster)
    cluster.version, op.hook._version_known = "slurm 20.02.7", False  # what a fresh connection finds
    ctx, _ = run(op)
    with pytest.raises(AirflowFailException, match="20.11 or newer"):
        op.execute(ctx)
    assert "sbatch" not in cluster.tools()
