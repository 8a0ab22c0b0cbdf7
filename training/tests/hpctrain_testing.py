"""Shared constants and helpers of the hpctrain tests (a uniquely named module, not conftest,
so that importing it never picks up another directory's conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"

#: a small but real surrogate run: 2 epochs, narrow MLP, one thread (the machine is shared)
SURROGATE_TINY = [
    "--config",
    str(CONFIGS / "surrogate.yaml"),
    "--trainer.max_epochs=2",
    "--data.batch_size=64",
    "--model.hidden_sizes=[32, 32]",
    "--model.warmup_steps=2",
    "--run.num_threads=1",
    "--run.export_program=false",
    "--trainer.enable_model_summary=false",
]

DEEPCAM_TINY = [
    "--config",
    str(CONFIGS / "deepcam.yaml"),
    "--trainer.max_epochs=1",
    "--data.num_samples=24",
    "--data.height=32",
    "--data.width=32",
    "--data.batch_size=4",
    "--model.width=4",
    "--run.num_threads=1",
    "--trainer.enable_model_summary=false",
]

# Variables that would leak the developer's environment into a run's decisions.
ISOLATED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MONGO_URI",
    "HPCTRAIN_JOB_DIR",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_CPUS_PER_TASK",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NUM_NODES",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NODELIST",
)


def spawn(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start ``python -m hpctrain ...`` as a child process (what the sbatch job runs)."""
    child_env = {k: v for k, v in os.environ.items() if k not in ISOLATED_ENV}
    child_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "hpctrain", *[str(a) for a in args]],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )
