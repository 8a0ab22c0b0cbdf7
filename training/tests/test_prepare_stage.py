"""``hpctrain prepare``: a pipeline stage's data set, the same bytes for the same arguments."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from hpctrain.cli import main
from hpctrain.evaluate import evaluate


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_writes_train_holdout_and_is_deterministic(tmp_path):
    assert main(["prepare", str(tmp_path / "a"), "--rows", "64", "--holdout-rows", "16", "--seed", "3"]) == 0
    assert main(["prepare", str(tmp_path / "b"), "--rows", "64", "--holdout-rows", "16", "--seed", "3"]) == 0
    for name in ("train.parquet", "holdout.parquet", "dataset.json"):
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
    train, holdout = pd.read_parquet(tmp_path / "a" / "train.parquet"), pd.read_parquet(tmp_path / "a" / "holdout.parquet")
    assert len(train) == 64 and len(holdout) == 16 and "flow" in holdout
    assert not train.iloc[:16].reset_index(drop=True).equals(holdout)  # another draw
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["seed"] == 3


def test_prepare_then_fit_then_evaluate_on_the_holdout(tmp_path, monkeypatch):
    """The three stages' commands, as the pipeline's jobs run them (CPU, one tiny epoch)."""
    from pathlib import Path

    data = tmp_path / "in" / "prepare"
    assert main(["prepare", str(data), "--rows", "128", "--holdout-rows", "32"]) == 0
    job = tmp_path / "job"
    job.mkdir()
    monkeypatch.chdir(job)
    monkeypatch.setenv("HPCTRAIN_JOB_DIR", str(job))
    config = Path(__file__).resolve().parents[1] / "configs" / "surrogate.yaml"
    rc = main(["fit", "--config", str(config), f"--data.path={data / 'train.parquet'}", "--trainer.max_epochs=1",
               "--run.tracking=off", "--model.hidden_sizes=[8, 8, 4]"])
    assert rc == 0
    spec = {"class_path": "hpctrain.data.TabularDataModule",
            "init_args": {"path": str(data / "holdout.parquet"), "features": ["rw", "r", "Tu", "Hu", "Tl", "Hl", "L", "Kw"],
                          "targets": ["flow"]}}
    result = evaluate(job / "model", spec)
    assert result["samples"] == 32 and result["metrics"]["val/loss"] > 0
