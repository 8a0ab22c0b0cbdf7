"""Two-process CPU DDP (gloo): under an srun-style launch (SLURMEnvironment) and Lightning's launcher.

Attempt 1 starts both ranks at once with the variables ``srun -n 2`` sets, so Lightning picks its
``SLURMEnvironment``; ``devices`` comes from the step layout. Only rank 0 gets SIGUSR2 (the case
Lightning's own handler deadlocks on: it saves inside the handler, and a rank that did not get the
signal never reaches the checkpoint barrier). Both ranks agree at the next batch end, checkpoint,
rank 0 calls ``scontrol requeue`` (a recording stand-in on PATH), and both exit 75.

Attempt 2 resumes with ``--trainer.strategy=ddp --trainer.devices=2`` outside Slurm: Lightning
starts rank 1 itself by re-running ``python -m hpctrain fit ...``.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from hpctrain.manifest import is_complete, load_manifest
from hpctrain_testing import SURROGATE_TINY, spawn

ARGS = [
    *SURROGATE_TINY,
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=3",
    "--data.batch_size=8",
    "--trainer.log_every_n_steps=1",
    "--run.tracking=offline",
]
STEPS_PER_EPOCH = 26  # 410 training rows -> 205 per rank -> 26 batches of 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_env(rank: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "hpctrain-ddp-test",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "MASTER_PORT": str(port),
        **extra,
    }


def _steps_logged(job) -> int:
    files = list(job.glob("mlruns-offline/*/*/metrics/train/loss"))
    return sum(1 for _ in files[0].open()) if files else 0


@pytest.mark.slow
def test_ddp_preempt_under_srun_then_resume_with_lightning_launcher(borehole_csv, tmp_path):
    job = tmp_path / "ddp"
    record = tmp_path / "scontrol.calls"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (fake_bin / "scontrol").chmod(0o755)
    import os

    path = f"{fake_bin}:{os.environ['PATH']}"
    port = _free_port()
    args = ["fit", *ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={job}"]
    ranks = [spawn(args, env=_srun_env(r, port, {"PATH": path})) for r in (0, 1)]
    deadline = time.monotonic() + 180
    try:
        while ranks[0].poll() is None and time.monotonic() < deadline:
            if _steps_logged(job) >= STEPS_PER_EPOCH + 6:
                ranks[0].send_signal(signal.SIGUSR2)
                break
            time.sleep(0.02)
        outs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [75, 75], outs
    assert "All distributed processes registered. Starting with 2 processes" in outs[0]
    assert "requeued=True" in outs[0]
    assert record.read_text().split() == ["requeue", "4242"]  # once, by rank 0
    first = load_manifest(job)
    assert first["status"] == "preempted" and first["slurm"]["SLURM_NTASKS"] == "2"
    assert STEPS_PER_EPOCH < first["training"]["global_step"] < 3 * STEPS_PER_EPOCH

    proc = spawn(
        [
            "fit",
            *ARGS,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            f"--data.path={borehole_csv}",
            f"--run.job_dir={job}",
        ]
    )
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    m = load_manifest(job)
    assert is_complete(m)
    assert m["training"]["resumed_from"] == "checkpoints/last.ckpt"
    assert m["training"]["global_step"] == 3 * STEPS_PER_EPOCH  # data sharded over 2 ranks
    assert [row["epoch"] for row in m["metrics"]["history"]] == [0, 1, 2]
    assert m["mlflow"]["run_id"] == first["mlflow"]["run_id"]
