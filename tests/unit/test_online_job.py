"""online_training's job (slurmflow.pipeline.online): one allocation, three steps, nothing secret."""

from __future__ import annotations

import subprocess

import pytest

from slurmflow.pipeline.experiments import config_path
from slurmflow.pipeline.jobs import Site
from slurmflow.pipeline.online import online_job, resources_text, sbatch_options
from slurmflow.pipeline.params import online_params
from slurmflow.pipeline.results import metrics_of, online_metrics
from slurmflow.sbatch import build_script, render_script

IMAGE = "127.0.0.1:5000/slurmflow/training@sha256:" + "a" * 64
SITE = Site("debug", "research", "docker", tracking_uri="http://mlflow:5001")


def defaults(**changes):
    return {**{k: p.value for k, p in online_params().items()}, **changes}


def test_the_allocation_holds_every_component_and_preflight_can_say_so():
    params = defaults(replicas=3, ranks_per_replica=4, trainer_ranks=2, cpus_per_task=2, qos="high")
    opts = sbatch_options(params, SITE)
    assert opts["ntasks"] == 1 + 12 + 2 and opts["cpus_per_task"] == 2 and opts["mem_per_cpu"] == "512M"
    assert opts["signal"] == "B:USR2@60" and opts["requeue"] is True and opts["qos"] == "high"
    assert opts["partition"] == "debug" and opts["account"] == "research"
    assert resources_text(params) == "1 store + 3 x 4 producers + 2 trainer rank(s) = 15 tasks of 2 CPU(s)"


def test_the_command_runs_store_producers_and_trainer_as_steps_with_their_own_cpus():
    job = online_job(defaults(trainer_ranks=2, rounds=7, interval_s=0.25), IMAGE, SITE)
    lines = job["command"].splitlines()
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 3 and all("--exact --kill-on-bad-exit=0" in line for line in srun)
    store, producers, trainer = srun
    assert "--ntasks=1 " in store and store.endswith("python -P -m hpctrain store --dir .staging")
    assert "--ntasks=4 " in producers and "--label" in producers
    assert "hpctrain produce --replicas=2 --ranks-per-replica=2 --rounds=7 --interval-s=0.25" in producers
    assert "--nodes=1 --ntasks-per-node=2 --wait=60" in trainer and "hpctrain fit --config experiment.yaml" in trainer
    # the staging variables reach every container by name only; the password's value is nowhere
    for line in srun:
        assert "-e SLURMFLOW_STAGING_ADDRESS -e SLURMFLOW_STAGING_NAMESPACE -e SLURMFLOW_STAGING_PASSWORD " in line
    assert "SLURMFLOW_STAGING_PASSWORD=" not in job["command"]
    # store and producers in process groups of their own (the preemption signal is the trainer's);
    # the trainer runs in the command's group, last, so its status is the job's
    assert lines.count("set -m") == 2 and lines.count("set +m") == 2
    assert lines[-1] == trainer
    assert any(line.startswith("trap 'kill -TERM -- ${sf_producer:+-$sf_producer} ${sf_store:+-$sf_store}")
               for line in lines)
    assert "trap : USR2" in lines  # the shell outlives the forwarded preemption signal (the trainer's)


def test_the_command_shell_outlives_the_preemption_signal_and_returns_the_trainers_status(tmp_path):
    """What the batch template does on preemption, with the fragment's shell lines around a
    stand-in trainer: the signal goes to the command's whole process group; the trainer traps it,
    "checkpoints" and exits 75; that must be the command's status (not 128+12: the shell killed)."""
    job = online_job(defaults(), IMAGE, SITE)
    lines = job["command"].splitlines()
    shell = [line for line in lines if line.startswith("trap ")]
    trainer = "python3 -c 'import signal,sys,time; signal.signal(signal.SIGUSR2, lambda *a: sys.exit(75)); " \
              "open(sys.argv[1], \"w\").close(); time.sleep(30)' " + str(tmp_path / "ready")
    script = "\n".join(["set -m", "(", *shell, trainer, ") &", "child=$!",
                        f"until [ -e {tmp_path / 'ready'} ]; do sleep 0.05; done",
                        'kill -s USR2 -- "-$child"', 'wait "$child"', "echo status=$?"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).stdout
    assert "status=75" in out, out


def test_the_rendered_script_is_valid_bash():
    job = online_job(defaults(), IMAGE, SITE)
    script = build_script(command=job["command"], job_name="train.x.g0", job_dir="/scratch/jobs/online 1",
                          options=job["sbatch_options"], secret_names=("SLURMFLOW_STAGING_PASSWORD",))
    text = render_script(script)
    assert "#SBATCH --ntasks=6" in text and "#SBATCH --mem-per-cpu=512M" in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_the_online_config_is_a_dag_owned_file_not_a_form_choice(tmp_path):
    assert config_path("online/online").name == "online.yaml"
    with pytest.raises(ValueError, match="unknown config"):
        config_path("online/../../../etc/passwd")
    assert "online" not in online_params() and "online/online" not in str(online_params())


def test_online_metrics_come_from_the_data_section_only_for_online_runs():
    data = {"kind": "online", "samples_consumed": 5120, "batches_consumed": 80,
            "batches_per_producer": {"a": 20, "b": 18}, "dead_producers": ["b"], "staleness_p50_s": 0.1,
            "staleness_p95_s": None, "wait_s": 2.5}
    assert online_metrics(data) == {
        "online/samples_consumed": 5120.0, "online/batches_consumed": 80.0, "online/batches_per_producer": 19.0,
        "online/batches_per_producer_min": 18.0, "online/dead_producers": 1.0, "online/staleness_p50_s": 0.1,
        "online/wait_s": 2.5}
    assert online_metrics({"kind": "mongo", "samples_consumed": 3}) == {}
    assert metrics_of({"metrics": {"final": {"train/accuracy": 0.9}}, "data": data})["online/dead_producers"] == 1.0


def test_each_submission_gets_a_fresh_store_password_that_never_becomes_a_templated_field():
    from slurmflow.pipeline.online_tasks import OnlineJobOperator

    op = OnlineJobOperator(task_id="train", command="true", secret_refs={})
    first, second = op._gather_secrets(), op._gather_secrets()
    assert first.names == ("SLURMFLOW_STAGING_PASSWORD",)
    assert first.values() != second.values() and len(first.values()[0]) >= 40
    assert op.secret_environment == {}
    assert first.values()[0] not in repr(first)


def test_a_store_that_does_not_come_up_ends_the_job_at_once_with_the_reason(tmp_path):
    """The command itself (runtime ``none``), with an ``srun`` that just runs its command and a
    redis-server that dies at start: ``hpctrain store`` reports it, the command stops before any
    producer or trainer, exit 1, in seconds (not the 60 s start timeout, and no hang)."""
    import sys
    import time
    from pathlib import Path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "redis-server").write_text("#!/bin/sh\necho 'FATAL: cannot allocate' >&2\nexit 1\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's, by path
    for name in ("srun", "redis-server", "python"):
        (bin_dir / name).chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    command = online_job(defaults(container_runtime="none"), None, SITE)["command"]  # none: python on PATH
    training_src = Path(__file__).resolve().parents[2] / "training" / "src"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURMFLOW_JOB_DIR": str(job_dir), "HPCTRAIN_JOB_DIR": str(job_dir),
           "SLURMD_NODENAME": "localhost", "SLURMFLOW_STAGING_PASSWORD": "p" * 32, "PYTHONPATH": str(training_src),
           "SLURM_JOB_ID": "7"}
    started = time.monotonic()
    out = subprocess.run(["bash", "-c", command], cwd=job_dir, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "[store] hpctrain store: the staging store did not come up" in text and "exited before it answered" in text
    assert "[slurmflow] the staging store did not come up" in text
    assert "[producer]" not in text and "hpctrain fit" not in text
    assert time.monotonic() - started < 45
    assert not (job_dir / ".staging" / "address").exists()
