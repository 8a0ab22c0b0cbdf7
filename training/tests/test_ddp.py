"""Two-process CPU DDP (gloo) as ``srun -n 2 python -m hpctrain fit ...`` runs it.

Both ranks start at once with the variables srun sets, so Lightning picks its ``SLURMEnvironment``
and ``devices`` comes from the step layout. Attempt 1: only rank 0 gets SIGUSR2 (the case
Lightning's own handler deadlocks on: it saves inside the handler, and a rank that did not get the
signal never reaches the checkpoint barrier). Both ranks agree at the next batch end, checkpoint
and exit 75; neither calls ``scontrol`` (a recording stand-in on PATH): the batch script owns the
requeue. Attempt 2 (``SLURM_RESTART_COUNT=1``, as after a requeue) resumes and finishes.

(Lightning's own launcher, ``--trainer.strategy=ddp --trainer.devices=2`` outside Slurm, works
too, but starts the second rank only after the first has imported everything, which doubles the
start-up time of a test on a two-core machine.)
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from hpctrain_testing import SURROGATE_TINY, spawn

from hpctrain.manifest import is_complete, load_manifest

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


def _srun(
    args: list[str], env: dict[str, str], signal_rank0_at: int | None = None
) -> tuple[list[int], list[str]]:
    """Start both ranks at once (as srun does); optionally SIGUSR2 rank 0 at a step."""
    port = _free_port()
    job = next(a.split("=", 1)[1] for a in args if a.startswith("--run.job_dir="))
    ranks = [spawn(args, env=_srun_env(r, port, env)) for r in (0, 1)]
    deadline = time.monotonic() + 180
    try:
        while signal_rank0_at and ranks[0].poll() is None and time.monotonic() < deadline:
            if _steps_logged(Path(job)) >= signal_rank0_at:
                ranks[0].send_signal(signal.SIGUSR2)
                break
            time.sleep(0.02)
        outs = [p.communicate(timeout=180)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in ranks], outs


@pytest.mark.slow
def test_ddp_under_srun_preempt_and_resume(borehole_csv, tmp_path):
    job = tmp_path / "ddp"
    record = tmp_path / "scontrol.calls"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (fake_bin / "scontrol").chmod(0o755)
    path = f"{fake_bin}:{os.environ['PATH']}"
    args = ["fit", *ARGS, f"--data.path={borehole_csv}", f"--run.job_dir={job}"]

    rcs, outs = _srun(args, {"PATH": path}, signal_rank0_at=STEPS_PER_EPOCH + 6)
    assert rcs == [75, 75], outs
    assert "All distributed processes registered. Starting with 2 processes" in outs[0]
    assert "preempted; checkpoint=" in outs[0]
    assert not record.exists()  # the training never requeues itself: the batch script does
    first = load_manifest(job)
    assert first["status"] == "preempted" and first["slurm"]["SLURM_NTASKS"] == "2"
    assert STEPS_PER_EPOCH < first["training"]["global_step"] < 3 * STEPS_PER_EPOCH

    rcs, outs = _srun(args, {"PATH": path, "SLURM_RESTART_COUNT": "1"})
    assert rcs == [0, 0], outs
    m = load_manifest(job)
    assert is_complete(m)
    assert m["training"]["resumed_from"] == "checkpoints/last.ckpt"
    assert m["training"]["global_step"] == 3 * STEPS_PER_EPOCH  # data sharded over 2 ranks
    assert [row["epoch"] for row in m["metrics"]["history"]] == [0, 1, 2]
    assert m["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert m["training"]["restart_count"] == 1 and m["slurm"]["SLURM_RESTART_COUNT"] == "1"
    assert m["hyperparameters"]["trainer"]["devices"] == 2  # from the srun step layout
