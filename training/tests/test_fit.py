"""CPU training of both reference tasks through the real command line, in this process."""

from __future__ import annotations

import json

import pytest
import torch
from hpctrain_testing import DEEPCAM_TINY, SURROGATE_TINY

from hpctrain.evaluate import evaluate
from hpctrain.export import load_model
from hpctrain.manifest import is_complete, load_manifest


def test_surrogate_fit_writes_complete_manifest(hpctrain, borehole_csv, tmp_path, capsys):
    job = tmp_path / "job"
    rc = hpctrain(
        "fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", "--model.lr=0.01", f"--run.job_dir={job}"
    )
    assert rc == 0
    m = load_manifest(job)
    assert is_complete(m) and m["status"] == "completed" and m["smoke"] is False

    # hyperparameters: the CLI overrides, plus the shapes the data decided
    hp = m["hyperparameters"]
    assert hp["model"]["lr"] == 0.01 and hp["model"]["hidden_sizes"] == [32, 32]
    assert hp["model"]["in_features"] == 8 and hp["model"]["out_features"] == 1
    assert hp["data"]["init_args"]["batch_size"] == 64 and hp["trainer"]["max_epochs"] == 2
    assert m["seed"] == 42

    # data identity of a file: its bytes
    import hashlib

    assert (
        m["data"]["kind"] == "file"
        and m["data"]["sha256"] == hashlib.sha256(borehole_csv.read_bytes()).hexdigest()
    )
    assert (m["data"]["rows"], m["data"]["train_rows"], m["data"]["val_rows"]) == (512, 410, 102)

    # metrics: final, best (by val/loss), per-epoch history
    assert m["monitor"] == {"metric": "val/loss", "mode": "min"}
    assert {"train/loss", "val/loss", "val/rmse", "val/r2"} <= set(m["metrics"]["final"])
    assert [row["epoch"] for row in m["metrics"]["history"]] == [0, 1]
    best = m["metrics"]["best"]
    assert best["val/loss"] == min(row["val/loss"] for row in m["metrics"]["history"])
    assert (job / m["best_checkpoint"]).is_file() and (job / "checkpoints/last.ckpt").is_file()

    # exported model: loads without Lightning state and reproduces the best validation loss
    model = load_model(job / m["model"]["path"])
    assert m["model"]["weights"] == "best" and m["model"]["format"] == "hpctrain.model/v1"
    spec = {
        "class_path": "hpctrain.data.TabularDataModule",
        "init_args": {
            "path": str(borehole_csv),
            "features": hp["data"]["init_args"]["features"],
            "targets": ["flow"],
        },
    }
    result = evaluate(job / m["model"]["path"], spec, split="val")
    assert result["metrics"]["val/loss"] == pytest.approx(best["val/loss"], rel=1e-4)
    assert result["samples"] == 102 and result["monitor"] == {"metric": "val/loss", "mode": "min"}
    assert model(torch.zeros(3, 8)).shape == (3, 1)

    # versions, Slurm facts (none here), tracking (no server configured -> offline store)
    assert {"python", "torch", "lightning", "hpctrain", "git_sha"} <= set(m["versions"])
    assert m["slurm"] == {}
    assert m["mlflow"]["mode"] == "offline" and (job / "mlruns-offline").is_dir()
    assert (job / "config.yaml").is_file()

    # re-running a finished job does not train again
    before = (job / "result.json").read_text()
    capsys.readouterr()
    assert hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", f"--run.job_dir={job}") == 0
    assert "already complete" in capsys.readouterr().out
    assert (job / "result.json").read_text() == before


def test_evaluate_compares_models_on_heldout_data(hpctrain, borehole_csv, borehole_parquet, tmp_path, capsys):
    """The nightly-retrain comparison: two exported models, one held-out spec, one metric."""
    jobs = {}
    for name, epochs in (("champion", 1), ("challenger", 3)):
        jobs[name] = tmp_path / name
        assert (
            hpctrain(
                "fit",
                *SURROGATE_TINY,
                f"--data.path={borehole_csv}",
                f"--trainer.max_epochs={epochs}",
                f"--run.job_dir={jobs[name]}",
                "--run.tracking=off",
            )
            == 0
        )
    spec = tmp_path / "heldout.yaml"
    spec.write_text(
        json.dumps(
            {
                "data": {
                    "class_path": "hpctrain.data.TabularDataModule",
                    "init_args": {
                        "path": str(borehole_parquet),
                        "features": ["rw", "r", "Tu", "Hu", "Tl", "Hl", "L", "Kw"],
                        "targets": ["flow"],
                    },
                }
            }
        )
    )
    scores = {}
    for name, job in jobs.items():
        capsys.readouterr()
        assert hpctrain("evaluate", "--model", job / "model", "--data", spec) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["samples"] == 512 and out["data"]["format"] == "parquet"
        scores[name] = out["metrics"]["val/loss"]
    assert scores["challenger"] < scores["champion"]  # more epochs on the same data: better


def test_smoke_mode_and_parquet(hpctrain, borehole_parquet, tmp_path):
    job = tmp_path / "smoke"
    assert (
        hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_parquet}", "--smoke", f"--run.job_dir={job}")
        == 0
    )
    m = load_manifest(job)
    assert m["status"] == "completed" and m["smoke"] is True and not is_complete(m)
    assert m["training"]["global_step"] == 1 and m["data"]["format"] == "parquet"
    assert (job / "model" / "model.pt").is_file()


def test_deepcam_segmentation_fit_and_export(hpctrain, tmp_path):
    job = tmp_path / "deepcam"
    assert hpctrain("fit", *DEEPCAM_TINY, f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert is_complete(m)
    assert m["monitor"] == {"metric": "val/iou", "mode": "max"}
    assert {"val/loss", "val/iou", "val/iou_cyclone", "val/iou_river", "val/accuracy"} <= set(
        m["metrics"]["final"]
    )
    assert (
        m["data"]["kind"] == "synthetic" and m["data"]["num_samples"] == 24 and len(m["data"]["sha256"]) == 64
    )
    assert (
        m["hyperparameters"]["model"]["in_channels"] == 4
        and m["hyperparameters"]["model"]["num_classes"] == 3
    )

    # model.pt (hpctrain loader) and model.pt2 (torch.export, no hpctrain needed) agree
    model = load_model(job / m["model"]["path"])
    program = torch.export.load(job / m["model"]["program_path"]).module()
    x = torch.randn(3, 4, 32, 32)
    assert torch.allclose(model(x), program(x), atol=1e-5)

    # the same generator seed gives the same data identity; another seed does not
    from hpctrain.data import ClimateSegmentationDataModule

    dm = ClimateSegmentationDataModule(num_samples=24, height=32, width=32, seed=0)
    dm.setup()
    assert dm.data_identity()["sha256"] == m["data"]["sha256"]

    # held-out evaluation: fresh snapshots from another generator seed
    spec = {
        "class_path": "hpctrain.data.ClimateSegmentationDataModule",
        "init_args": {"num_samples": 8, "height": 32, "width": 32, "seed": 99},
    }
    result = evaluate(job / "model", spec)
    assert result["samples"] == 8 and result["data"]["seed"] == 99
    assert 0.0 <= result["metrics"]["val/iou"] <= 1.0 and result["monitor"] == {
        "metric": "val/iou",
        "mode": "max",
    }


def test_training_without_validation_keeps_last_checkpoint_only(hpctrain, borehole_csv, tmp_path):
    job = tmp_path / "noval"
    assert (
        hpctrain(
            "fit",
            *SURROGATE_TINY,
            f"--data.path={borehole_csv}",
            "--data.val_fraction=0",
            "--trainer.max_epochs=1",
            f"--run.job_dir={job}",
        )
        == 0
    )
    m = load_manifest(job)
    assert is_complete(m) and m["model"]["weights"] == "last" and m["best_checkpoint"] is None
    assert m["monitor"]["metric"] is None and "val/loss" not in m["metrics"]["final"]


def test_history_rows_hold_each_epochs_own_metrics(hpctrain, borehole_csv, tmp_path):
    job = tmp_path / "job"
    assert (
        hpctrain(
            "fit",
            *SURROGATE_TINY,
            f"--data.path={borehole_csv}",
            "--trainer.max_epochs=3",
            "--run.tracking=offline",
            "--trainer.log_every_n_steps=1",
            f"--run.job_dir={job}",
        )
        == 0
    )
    m = load_manifest(job)
    from mlflow.tracking import MlflowClient

    from hpctrain.tracking import allow_file_store

    with allow_file_store():
        client = MlflowClient((job / "mlruns-offline").as_uri())
        logged = client.get_metric_history(m["mlflow"]["run_id"], "train/loss_epoch")
    by_step = {metric.step: metric.value for metric in logged}
    rows = m["metrics"]["history"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # every row carries the epoch mean logged at that epoch's end, not the previous epoch's
    assert [pytest.approx(r["train/loss_epoch"]) for r in rows] == [by_step[r["step"] - 1] for r in rows]
