"""Checkpoint-and-stop when Slurm announces preemption or the time limit.

:class:`PreemptionCallback` polls the :class:`~hpctrain.signals.SignalLatch` at every training
batch end. When any rank has seen the signal, all ranks agree on it (one boolean all-reduce), save
``checkpoints/last.ckpt`` together (Lightning writes it atomically on rank 0), and every rank
raises :class:`~hpctrain.errors.Preempted`, which the command line turns into exit code 75
(``EX_TEMPFAIL``: "checkpoint saved, run me again"). The training never requeues itself: inside a
container there is no Slurm client, so whoever launched it does (slurmflow's batch script runs
``scontrol requeue`` on the node when the command exits 75). The next attempt finds ``last.ckpt``
and resumes with the same model, optimizer, scheduler, loop counters, RNG state and data position.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from hpctrain.errors import Preempted
from hpctrain.signals import SignalLatch

log = logging.getLogger(__name__)

class PreemptionCallback(Callback):
    """Save a resumable checkpoint and stop (exit 75) when the preemption signal arrives.

    :param latch: the latch the signal handler sets (installed by the command line).
    :param checkpoint_path: where to save; ``<job_dir>/checkpoints/last.ckpt`` so that the next
        attempt's ``ckpt_path="last"`` finds it.
    :param check_every_n_steps: how often the ranks agree on the flag; 1 costs one tiny all-reduce
        per step under DDP (none on one process) and reacts within one step of the warning.
    """

    def __init__(
        self,
        latch: SignalLatch,
        checkpoint_path: str | os.PathLike[str],
        check_every_n_steps: int = 1,
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
        self.latch = latch
        self.checkpoint_path = Path(checkpoint_path)
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
        if trainer.is_global_zero:
            log.warning(
                "preemption signal %s: checkpoint %s at global step %d",
                self.latch.signal.name,
                checkpoint,
                trainer.global_step,
            )
        raise Preempted(checkpoint)

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
