"""A sweep's registration against the real login node, Slurm and MLflow: one tar stream per array
job, failed trials explained from sacct and their logs, trial runs nested and logged once."""

from __future__ import annotations

import json
import shlex
import time
import uuid

import pytest

from slurmflow.hooks.mlflow import RUN_KEY_TAG, MlflowHook
from slurmflow.hooks.slurm import SlurmHook
from slurmflow.identity import JobKey
from slurmflow.pipeline import sweep_results as sr
from slurmflow.sbatch import build_script, render_script
from tests.integration import test_slurm_fixtures as live

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn
EXPERIMENT = "it-sweep-registration"


def manifest(trial: int, run_id: str | None) -> dict:
    loss = 1.0 / (trial + 1)
    return {"status": "completed", "hyperparameters": {"model": {"lr": 0.001 * (trial + 1)}},
            "metrics": {"final": {"val/loss": loss}, "best": {"val/loss": loss}},
            "monitor": {"metric": "val/loss", "mode": "min"},
            "mlflow": {"experiment": EXPERIMENT, "mode": "online" if run_id else "offline", "run_id": run_id}}


def test_a_piece_with_a_failed_trial_registers_the_rest_once(slurm_conn, stack_connections, stack_env, tmp_path):
    slurm, mlflow = SlurmHook(), MlflowHook()
    experiment_id = mlflow.experiment_id(EXPERIMENT)
    live_run = mlflow.client.create_run(experiment_id).info.run_id  # trial 0 logged live from its job
    # Each array task writes its trial's result.json as hpctrain would; task 2 fails.
    branches = "\n".join(
        f"{t}) cat > \"$d/result.json\" <<'EOF'\n{json.dumps(manifest(t, live_run if t == 0 else None))}\nEOF\n;;"
        for t in (0, 1, 3))
    command = ('d="$SLURMFLOW_JOB_DIR/trial-$SLURM_ARRAY_TASK_ID"; mkdir -p "$d"\n'
               f'case "$SLURM_ARRAY_TASK_ID" in\n{branches}\n'
               "2) echo 'boom: out of luck'; exit 3 ;;\nesac\n")
    key = JobKey("it_sweep", uuid.uuid4().hex, "train", 0)
    script = build_script(command=command, job_name=key.job_name(0), job_dir=key.job_dir(slurm.job_root, 0),
                          options={"account": "research", "time": "5", "array": "0-3%2"})
    job_id = slurm.submit(key, 0, script, render_script(script)).job_id
    deadline = time.monotonic() + 180
    while not slurm.get_states([job_id])[job_id].state.is_terminal:  # every array task ended
        assert time.monotonic() < deadline, "the array did not end"
        time.sleep(2)
    piece = {"job_id": job_id, "job_dir": script.job_dir, "array": {"total": 4},
             "paths": script.paths(stack_env["SSH_USER"]).to_dict()}
    trials = [{"lr": 0.001 * (t + 1)} for t in range(4)]

    outcome = sr.layout([piece], trials)
    sr.collect(slurm, outcome, tmp_path / "a")
    sr.explain_failures(slurm, outcome)
    assert [t.completed for t in outcome] == [True, True, False, True]
    failed = outcome[2]
    assert failed.state == "FAILED" and "exit code 3" in failed.reason and "boom: out of luck" in failed.log_tail
    assert sr.failed_fraction(outcome) == 0.25
    total = sr.usage(slurm, outcome)  # one sacct for the whole array: every trial's own figures
    assert [t.usage.job_id for t in outcome] == [f"{job_id}_{t}" for t in range(4)]
    assert outcome[2].usage.state == "FAILED" and all(t.usage.alloc_cpus >= 1 for t in outcome)
    assert total.as_dict()["tasks"] == 4

    sweep_key = f"it_sweep/{key.run_id}/train/-1/g0"
    summary = mlflow.log_training(experiment=EXPERIMENT, run_key=f"{sweep_key}/sweep", run_name="s",
                                  params={}, metrics={}, tags={})
    context = sr.SweepContext(sweep_key, summary, "img@sha256:" + "0" * 64, {"airflow.dag_id": "it_sweep"})
    sr.log_trials(mlflow, outcome, context, experiment_id)
    first = {t.index: t.run_id for t in outcome if t.completed}
    assert first[0] == live_run  # the training's own live run is adopted, not duplicated

    again = sr.layout([piece], trials)  # a retry of register: same runs, nothing logged twice
    sr.collect(slurm, again, tmp_path / "b")
    sr.log_trials(mlflow, again, context, experiment_id)
    assert {t.index: t.run_id for t in again if t.completed} == first

    runs = mlflow.client.search_runs([experiment_id], filter_string=f"tags.`{sr.SWEEP_TAG}` = '{sweep_key}'")
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in runs) == [f"{sweep_key}/trial-{i}" for i in (0, 1, 3)]
    for run in runs:
        assert run.data.tags[sr.PARENT_TAG] == summary and run.info.status == "FINISHED"
        assert run.data.metrics["best/val/loss"] > 0 and run.data.tags["slurm.job_id"].startswith(f"{job_id}_")
        assert mlflow.client.list_artifacts(run.info.run_id, "result") == []  # manifests go to the summary run
        assert int(run.data.tags["slurm.alloc_cpus"]) >= 1


def test_download_matching_brings_only_what_matches_in_one_stream(slurm_conn, tmp_path):
    slurm = SlurmHook()
    root = f"{slurm.job_root}/it_tar/{uuid.uuid4().hex}"
    slurm.make_dirs([f"{root}/trial-0/mlruns-offline/x", f"{root}/trial-1", f"{root}/other"])
    for path, text in {"trial-0/result.json": "a", "trial-0/mlruns-offline/x/m": "m", "trial-0/big.ckpt": "no",
                       "trial-1/config.yaml": "c", "other/result.json": "no", "job.sbatch": "s"}.items():
        slurm.upload(f"{root}/{path}", text)
    names = ["result.json", "config.yaml", "mlruns-offline"]
    got = slurm.download_matching(root, [f"trial-*/{n}" for n in names], tmp_path / "sweep")
    assert got == [tmp_path / "sweep" / "trial-0", tmp_path / "sweep" / "trial-1"]
    files = sorted(str(p.relative_to(tmp_path / "sweep")) for p in (tmp_path / "sweep").rglob("*") if p.is_file())
    assert files == ["trial-0/mlruns-offline/x/m", "trial-0/result.json", "trial-1/config.yaml"]
    # one job directory: its own files, not its subdirectories'
    got = slurm.download_matching(root, ["job.sbatch", "result.json"], tmp_path / "one")
    assert got == [tmp_path / "one" / "job.sbatch"]
    assert slurm.download_matching(root, ["nothing-*/result.json"], tmp_path / "none") == []
    with pytest.raises(Exception, match="tar|No such"):
        slurm.download_matching(f"{root}/{shlex.quote('missing dir')}", ["result.json"], tmp_path)
    with pytest.raises(ValueError, match="stays below"):
        slurm.download_matching(root, ["../etc/passwd"], tmp_path)
