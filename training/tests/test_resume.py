"""Preemption: the signal checkpoints mid-epoch, the next attempt resumes bit for bit."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from hpctrain_testing import SURROGATE_TINY, spawn

from hpctrain.manifest import is_complete, load_manifest

STEPS_PER_EPOCH = 52  # ceil(410 training rows / batch 8)

# Small batches, dropout (so the RNG state matters), a warm-up + cosine schedule (so the
# scheduler state matters), and a metric line per step to watch progress from outside.
RESUME_ARGS = [
    *SURROGATE_TINY,
    "--trainer.max_epochs=3",
    "--data.batch_size=8",
    "--model.dropout=0.1",
    "--model.warmup_steps=10",
    "--trainer.log_every_n_steps=1",
    "--run.tracking=offline",
]


def _steps_logged(job: Path) -> int:
    files = list(job.glob("mlruns-offline/*/*/metrics/train/loss"))
    return sum(1 for _ in files[0].open()) if files else 0


def _preempt_midway(job: Path, data: Path, at_step: int) -> tuple[int, str]:
    """Run fit in a child process and send it SIGUSR2 once ``at_step`` steps are logged."""
    proc = spawn(["fit", *RESUME_ARGS, f"--data.path={data}", f"--run.job_dir={job}"])
    deadline = time.monotonic() + 150
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _steps_logged(job) >= at_step:
                proc.send_signal(signal.SIGUSR2)
                break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_preempted_run_resumes_to_identical_state(hpctrain, borehole_csv, tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"

    rc, out = _preempt_midway(interrupted, borehole_csv, at_step=STEPS_PER_EPOCH + 20)
    assert rc == 75, out
    assert "preemption signal SIGUSR2" in out
    ckpt = _load(interrupted / "checkpoints" / "last.ckpt")
    stopped_at = ckpt["global_step"]
    assert STEPS_PER_EPOCH < stopped_at < 3 * STEPS_PER_EPOCH
    assert stopped_at % STEPS_PER_EPOCH != 0, "signal should land mid-epoch"
    manifest = load_manifest(interrupted)
    assert manifest["status"] == "preempted" and not is_complete(manifest)

    # the next attempt (same command, same job dir) resumes and finishes
    assert hpctrain("fit", *RESUME_ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={interrupted}") == 0
    resumed = load_manifest(interrupted)
    assert is_complete(resumed)
    assert resumed["training"]["resumed_from"] == "checkpoints/last.ckpt"
    assert resumed["mlflow"]["run_id"] == manifest["mlflow"]["run_id"]  # one MLflow run across attempts
    assert [row["epoch"] for row in resumed["metrics"]["history"]] == [0, 1, 2]
    # each attempt's steps: the second resumed exactly where the first stopped (nothing redone)
    assert [(a["start_step"], a["end_step"], a["status"]) for a in resumed["training"]["attempts"]] == [
        (0, stopped_at, "preempted"), (stopped_at, 3 * STEPS_PER_EPOCH, "completed")]

    # an uninterrupted run with the same seed ends in exactly the same state
    assert hpctrain("fit", *RESUME_ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={reference}") == 0
    a, b = _load(interrupted / "checkpoints" / "last.ckpt"), _load(reference / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    for key, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], tensor), key
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for pid, state in opt_b["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(opt_a["state"][pid][name]), torch.as_tensor(value)), (
                pid,
                name,
            )
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    assert resumed["metrics"]["best"] == load_manifest(reference)["metrics"]["best"]


def test_signal_before_training_starts_exits_preempted(hpctrain, borehole_csv, tmp_path, capsys):
    """A signal during startup (imports, data loading) is latched, not fatal: exit 75, no training."""
    import os

    from hpctrain.signals import install_process_latch

    install_process_latch("SIGUSR2")
    os.kill(os.getpid(), signal.SIGUSR2)
    rc = hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", f"--run.job_dir={tmp_path}")
    assert rc == 75
    manifest = load_manifest(tmp_path)
    assert manifest["status"] == "preempted"
    assert manifest["training"]["attempts"] == [{"restart": 0, "start_step": None, "end_step": None,
                                                 "status": "preempted"}]
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
