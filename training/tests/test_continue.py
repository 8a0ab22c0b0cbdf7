"""Continue a previous experiment (``run.init_from``): resume or weights only, epochs as Lightning
counts them, and a requeued continued job resuming its own checkpoint, not its parent's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hpctrain_testing import SURROGATE_TINY

# A constant rate after a short warm-up: the schedule does not depend on max_epochs, so a run
# continued from epoch 2 to 4 must equal an uninterrupted 4-epoch run only if the optimizer
# (Adam moments), the scheduler and the RNG streams all came along.
ARGS = [*SURROGATE_TINY, "--model.lr_schedule=constant", "--model.dropout=0.1", "--run.tracking=off",
        "--run.tensorboard=false"]


def _manifest(job: Path) -> dict:
    return json.loads((job / "result.json").read_text())


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, borehole_csv) -> Path:
    """A finished 2-epoch job (run once for the module, in a child-free in-process run)."""
    from hpctrain.cli import main
    from hpctrain.signals import reset_process_latch

    job = tmp_path_factory.mktemp("parent")
    try:
        assert main(["fit", *ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={job}"]) == 0
    finally:
        reset_process_latch()
    return job


def _continued(tmp_path: Path, parent: Path, name: str = "child") -> Path:
    """A new job directory holding the parent's checkpoint where slurmflow copies it."""
    job = tmp_path / name
    (job / "init").mkdir(parents=True)
    shutil.copy2(parent / "checkpoints" / "last.ckpt", job / "init" / "parent.ckpt")
    return job


def test_resume_trains_only_the_remaining_epochs_with_optimizer_state(hpctrain, parent, borehole_csv, tmp_path):
    before = (parent / "checkpoints" / "last.ckpt").read_bytes()
    job = _continued(tmp_path, parent)
    rc = hpctrain("fit", *ARGS, "--trainer.max_epochs=4", f"--data.path={borehole_csv}", f"--run.job_dir={job}",
                  "--run.init_from=init/parent.ckpt")
    assert rc == 0
    first, result = _manifest(parent), _manifest(job)
    steps = first["training"]["global_step"]
    training = result["training"]
    assert training["epochs_completed"] == 4 and training["global_step"] == 2 * steps
    assert training["attempts"][0]["start_step"] == steps  # epochs 3 and 4 only
    assert training["resumed_from"] == "init/parent.ckpt"
    assert training["init_from"] == {"path": "init/parent.ckpt", "mode": "resume", "parent_epochs": 2,
                                     "parent_global_step": steps}
    assert [row["epoch"] for row in result["metrics"]["history"]] == [0, 1, 2, 3]  # the parent's rows too
    assert (parent / "checkpoints" / "last.ckpt").read_bytes() == before  # the parent is left intact

    # the same as training 4 epochs at once: weights, Adam moments and schedule all came along
    straight = tmp_path / "straight"
    assert hpctrain("fit", *ARGS, "--trainer.max_epochs=4", f"--data.path={borehole_csv}",
                    f"--run.job_dir={straight}") == 0
    a, b = _state(job / "checkpoints" / "last.ckpt"), _state(straight / "checkpoints" / "last.ckpt")
    for key, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], tensor), key
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    for index in moments_b:
        assert torch.equal(moments_a[index]["exp_avg"], moments_b[index]["exp_avg"])
        assert int(moments_a[index]["step"]) == int(moments_b[index]["step"]) == 2 * steps
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_weights_mode_starts_at_epoch_zero_from_the_parents_weights(hpctrain, parent, borehole_csv, tmp_path):
    job = _continued(tmp_path, parent)
    rc = hpctrain("fit", *ARGS, "--trainer.max_epochs=1", f"--data.path={borehole_csv}", f"--run.job_dir={job}",
                  "--run.init_from=init/parent.ckpt", "--run.init_mode=weights")
    assert rc == 0
    steps = _manifest(parent)["training"]["global_step"]
    training = _manifest(job)["training"]
    assert training["epochs_completed"] == 1 and training["global_step"] == steps // 2
    assert training["attempts"][0]["start_step"] == 0 and training["resumed_from"] is None
    assert training["init_from"]["mode"] == "weights"
    state = _state(job / "checkpoints" / "last.ckpt")
    assert int(state["optimizer_states"][0]["state"][0]["step"]) == steps // 2  # a fresh optimizer

    # warm-started: its first epoch is better than a cold start's first epoch
    cold = tmp_path / "cold"
    assert hpctrain("fit", *ARGS, "--trainer.max_epochs=1", f"--data.path={borehole_csv}",
                    f"--run.job_dir={cold}") == 0
    warm_loss = _manifest(job)["metrics"]["history"][0]["val/loss"]
    cold_loss = _manifest(cold)["metrics"]["history"][0]["val/loss"]
    assert warm_loss < cold_loss


def test_max_epochs_already_reached_is_a_clear_config_error(hpctrain, parent, borehole_csv, tmp_path, capsys):
    job = _continued(tmp_path, parent)
    rc = hpctrain("fit", *ARGS, "--trainer.max_epochs=2", f"--data.path={borehole_csv}", f"--run.job_dir={job}",
                  "--run.init_from=init/parent.ckpt")
    assert rc == 2
    err = capsys.readouterr().err
    assert "trainer.max_epochs=2 is already reached" in err and "trained 2 epoch(s)" in err
    assert not (job / "checkpoints" / "last.ckpt").exists()


def test_missing_parent_checkpoint_is_a_config_error(hpctrain, borehole_csv, tmp_path, capsys):
    rc = hpctrain("fit", *ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={tmp_path / 'job'}",
                  "--run.init_from=init/parent.ckpt")
    assert rc == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_a_requeued_continued_job_resumes_its_own_checkpoint(hpctrain, parent, borehole_csv, tmp_path):
    job = _continued(tmp_path, parent)
    args = [*ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={job}", "--run.init_from=init/parent.ckpt"]
    assert hpctrain("fit", *args, "--trainer.max_epochs=3") == 0
    steps = _manifest(parent)["training"]["global_step"]
    # What a requeue finds: the job's own last.ckpt (3 epochs) and no finished result.json yet
    (job / "result.json").unlink()
    assert hpctrain("fit", *args, "--trainer.max_epochs=4") == 0
    training = _manifest(job)["training"]
    assert training["resumed_from"] == "checkpoints/last.ckpt"
    assert training["attempts"][-1]["start_step"] == 3 * steps // 2  # its own epoch 3, not the parent's 2
    assert training["epochs_completed"] == 4
    assert training["init_from"]["path"] == "init/parent.ckpt"  # the lineage is still recorded
