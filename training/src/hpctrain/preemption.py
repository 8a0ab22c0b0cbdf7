"""Checkpoint-and-requeue when Slurm announces preemption or the time limit.

:class:`PreemptionCallback` polls the :class:`~hpctrain.signals.SignalLatch` at every training
batch end. When any rank has seen the signal, all ranks agree on it (one boolean all-reduce), save
``checkpoints/last.ckpt`` together (Lightning writes it atomically on rank 0), rank 0 asks Slurm to
requeue the job, and every rank raises :class:`~hpctrain.errors.Preempted`, which the command line
turns into exit code 75. The next attempt finds ``last.ckpt`` and resumes with the same model,
optimizer, scheduler, loop counters, RNG state and data position.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from hpctrain.errors import Preempted
from hpctrain.signals import SignalLatch

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks, else the job id.

    :param environ: mapping to read, for tests; defaults to the process environment.
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env.get("SLURM_JOB_ID", "")
    return job_id if _JOB_ID.match(job_id) else None


def requeue_job(environ: dict[str, str] | None = None, timeout: float = 30.0) -> bool:
    """Ask Slurm to requeue the current job; ``False`` when not under Slurm or when refused.

    The job must be requeueable (``sbatch --requeue`` or the cluster's ``JobRequeue=1``). Slurm
    then stops this allocation and queues the same job id again, with ``SLURM_RESTART_COUNT``
    incremented.

    :param environ: mapping to read the job id from; defaults to the process environment.
    :param timeout: seconds to wait for ``scontrol``.
    """
    job_id = slurm_job_id(environ)
    if job_id is None:
        log.info("not running under Slurm (no SLURM_JOB_ID): checkpoint saved, not requeueing")
        return False
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("scontrol requeue %s failed: %s", job_id, exc)
        return False
    if proc.returncode != 0:
        log.warning("scontrol requeue %s refused (rc=%s): %s", job_id, proc.returncode, proc.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job_id)
    return True


class PreemptionCallback(Callback):
    """Save a resumable checkpoint and requeue when the preemption signal arrives.

    :param latch: the latch the signal handler sets (installed by the command line).
    :param checkpoint_path: where to save; ``<job_dir>/checkpoints/last.ckpt`` so that the next
        attempt's ``ckpt_path="last"`` finds it.
    :param requeue: run ``scontrol requeue`` after saving (off when the orchestrator requeues).
    :param check_every_n_steps: how often the ranks agree on the flag; 1 costs one tiny all-reduce
        per step under DDP (none on one process) and reacts within one step of the warning.
    """

    def __init__(
        self,
        latch: SignalLatch,
        checkpoint_path: str | os.PathLike[str],
        requeue: bool = True,
        check_every_n_steps: int = 1,
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
        self.latch = latch
        self.checkpoint_path = Path(checkpoint_path)
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self.preempted_at_step: int | None = None

    def _agreed(self, trainer: pl.Trainer) -> bool:
        # all=False: stop if ANY rank got the signal. Outside srun only the launching process may
        # receive it, and every rank must take part in the checkpoint's collectives.
        return bool(trainer.strategy.reduce_boolean_decision(self.latch.triggered, all=False))

    def _stop(self, trainer: pl.Trainer, save: bool) -> None:
        checkpoint: str | None = None
        if save:
            trainer.save_checkpoint(self.checkpoint_path)
            checkpoint = str(self.checkpoint_path)
        elif self.checkpoint_path.exists():
            checkpoint = str(self.checkpoint_path)
        self.preempted_at_step = trainer.global_step
        requeued = False
        if trainer.is_global_zero:
            log.warning(
                "preemption signal %s: checkpoint %s at global step %d",
                self.latch.signal.name,
                checkpoint,
                trainer.global_step,
            )
            requeued = self.requeue and requeue_job()
        raise Preempted(checkpoint, requeued)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The signal came during startup (imports, data loading, restore): nothing new to save,
        # the checkpoint we resumed from (if any) is still the latest state.
        if self._agreed(trainer):
            self._stop(trainer, save=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Never stop inside a gradient-accumulation window: the partial gradients are not part of
        # a checkpoint, so resuming there would not reproduce the uninterrupted run.
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        if trainer.global_step % self.check_every_n_steps == 0 and self._agreed(trainer):
            self._stop(trainer, save=True)
