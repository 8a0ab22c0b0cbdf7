"""train_model's ``target_iou`` Param, and the registration of a job's TensorBoard files and MLPerf log.

Registration runs against a real MLflow file store (no server): what lands in the run is what
MLflow itself lists.
"""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest

from slurmflow.pipeline import results
from slurmflow.pipeline.jobs import check_training_params, training_argv
from slurmflow.pipeline.params import train_params


def params(**conf):
    """train_model's Params as Airflow resolves them: the schema-checked conf over the defaults."""
    schema = train_params()
    merged = {name: p.value for name, p in schema.items()}
    for name, value in conf.items():
        jsonschema.validate(value, schema[name].schema)
    merged.update(conf)
    return merged


# -- target_iou -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, 0.82, 1, 1e-6])
def test_target_iou_admits_null_and_fractions_up_to_one(value):
    jsonschema.validate(value, train_params()["target_iou"].schema)


@pytest.mark.parametrize("value", [0, -0.1, 1.01, "0.8", True])
def test_target_iou_refuses_what_is_no_iou(value):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, train_params()["target_iou"].schema)


def test_target_iou_reaches_the_deepcam_job_as_its_run_target():
    argv = training_argv(params(task="deepcam", target_iou=0.82))
    assert "--run.target=0.82" in argv
    assert not any(a.startswith("--run.target") for a in training_argv(params(task="deepcam")))


def test_target_iou_on_a_task_without_iou_is_refused_with_the_reason():
    check_training_params(params(task="deepcam", target_iou=0.5))
    check_training_params(params(task="surrogate"))  # unset: fine for every task
    with pytest.raises(ValueError, match=r"target_iou=0.5 .* only the deepcam task .* 'surrogate' has none"):
        check_training_params(params(task="surrogate", target_iou=0.5))
    with pytest.raises(ValueError, match="target_iou"):  # the job spec refuses it too
        training_argv(params(task="surrogate", target_iou=0.5))


# -- registration -----------------------------------------------------------------------------
class FakeSlurm:
    """``download_matching`` over a local folder standing in for the cluster's job directory."""

    def __init__(self) -> None:
        self.patterns: list[list[str]] = []

    def download_matching(self, root: str, patterns, local: Path) -> list[Path]:
        self.patterns.append(list(patterns))
        local.mkdir(parents=True, exist_ok=True)
        for entry in Path(root).rglob("*"):
            rel = entry.relative_to(root).as_posix()
            if any(fnmatch(rel, p) for p in patterns):
                target = local / rel
                if entry.is_dir():
                    shutil.copytree(entry, target, dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(entry, target)
        return []


def a_job_dir(root: Path, **manifest) -> Path:
    root.mkdir(parents=True)
    (root / "tensorboard").mkdir()
    (root / "tensorboard" / "events.out.tfevents.1.node").write_bytes(b"\x00" * 16)
    (root / "tensorboard" / "hparams.yaml").write_text("lr: 0.002\n")
    (root / "mlperf.log").write_text(':::MLLOG {"key": "run_start"}\n')
    (root / "result.json").write_text(json.dumps({
        "status": "completed", "mlflow": {"mode": "offline", "experiment": "deepcam"},
        "hyperparameters": {"model": {"lr": 0.002}},
        "metrics": {"final": {"val/iou": 0.83}, "best": {"val/iou": 0.83, "epoch": 4}},
        "target": {"metric": "val/iou", "mode": "max", "value": 0.82, "epoch": 4},
        "target_reached": True, **manifest,
    }))
    return root


@pytest.fixture
def mlflow_hook(tmp_path, monkeypatch):
    from slurmflow.hooks.mlflow import MlflowHook

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    hook = MlflowHook()
    hook.__dict__.update(tracking_uri=(tmp_path / "mlruns").as_uri(), _creds=None)  # cached properties
    return hook


def test_a_single_training_logs_its_tensorboard_folder_mlperf_log_and_time_to_target(tmp_path, mlflow_hook):
    cluster = a_job_dir(tmp_path / "cluster" / "job", time_to_target_s=12.5)
    slurm, local = FakeSlurm(), tmp_path / "local"
    manifest = results.collect(slurm, str(cluster), local)
    assert {"tensorboard", "mlperf.log"} <= set(slurm.patterns[0])

    out = results.register(manifest, local, run_key="train_model/r1/train/-1/g0", model_name="m",
                           job={"job_id": "7", "job_dir": str(cluster)}, image="img@sha256:x",
                           sbatch_script="#!/bin/bash\n", mlflow=mlflow_hook, register_model=False)
    client = mlflow_hook.client
    listed = {f.path for f in client.list_artifacts(out["run_id"], "tensorboard")}
    assert listed == {"tensorboard/events.out.tfevents.1.node", "tensorboard/hparams.yaml"}
    assert [f.path for f in client.list_artifacts(out["run_id"], "mlperf")] == ["mlperf/mlperf.log"]
    run = client.get_run(out["run_id"])
    assert run.data.metrics["time_to_target_s"] == 12.5 and out["metrics"]["time_to_target_s"] == 12.5


def test_a_run_without_side_logs_or_target_registers_as_before(tmp_path, mlflow_hook):
    cluster = a_job_dir(tmp_path / "cluster" / "job", time_to_target_s=None, target_reached=False)
    shutil.rmtree(cluster / "tensorboard")
    (cluster / "mlperf.log").unlink()
    local = tmp_path / "local"
    manifest = results.collect(FakeSlurm(), str(cluster), local)
    out = results.register(manifest, local, run_key="train_model/r2/train/-1/g0", model_name="m",
                           job={"job_id": "8", "job_dir": str(cluster)}, image="img@sha256:x",
                           sbatch_script="", mlflow=mlflow_hook, register_model=False)
    top = {f.path for f in mlflow_hook.client.list_artifacts(out["run_id"])}
    assert top == {"slurm", "result"} and "time_to_target_s" not in out["metrics"]


def test_a_sweep_copies_no_trial_side_logs(tmp_path):
    """A sweep of 1,000 trials stays one MLflow request per trial: its trials' TensorBoard folders
    and MLPerf logs are neither copied back nor uploaded."""
    from slurmflow.pipeline import sweep_results as sr

    slurm = FakeSlurm()
    trial = sr.Trial(index=0, params={"lr": 0.1}, piece=0, job={"job_dir": str(tmp_path / "sweep")}, array_task=0)
    a_job_dir(tmp_path / "sweep" / "trial-0")
    sr.collect(slurm, [trial], tmp_path / "local")
    assert not any("tensorboard" in p or "mlperf" in p for p in slurm.patterns[0])
    assert trial.manifest["status"] == "completed" and not (trial.local / "tensorboard").exists()
