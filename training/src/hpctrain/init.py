"""Continue a previous experiment: start a job from another run's checkpoint (``run.init_from``).

Preemption already resumes a job from ``checkpoints/last.ckpt`` in its *own* directory. A
continued job is a new job that starts from its *parent's* checkpoint, and the two must not mix:

* a job that has a ``last.ckpt`` of its own is a requeued attempt: it resumes from that, and
  ``init_from`` is ignored (the parent's state is already in it);
* otherwise ``init_mode: resume`` hands the parent's checkpoint to ``Trainer.fit(ckpt_path=...)``:
  model, optimizer, scheduler, loop counters and epoch come along, so ``trainer.max_epochs``
  counts every epoch as Lightning does, the parent's included (the DVC guide's "epochs are
  absolute"); a parent that already trained ``max_epochs`` is a config error, not a silent no-op;
* ``init_mode: weights`` loads the model's ``state_dict`` only: fresh optimizer and schedule,
  epoch 0 (fine-tuning).

The checkpoint is read, never written: the orchestrator copies the parent's file into the new
job directory first (slurmflow: ``init/parent.ckpt``), so the parent's job stays intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from hpctrain.errors import ConfigError
from hpctrain.job import JobDir

#: keys of a task's state_dict that are metric accumulators, not weights (see TaskModule)
_METRIC_STATE_PREFIXES = ("train_loss.", "val_loss.", "val_metrics.")


@dataclass(frozen=True)
class InitCheckpoint:
    """The parent checkpoint a continued job starts from.

    :param path: absolute path of the checkpoint file.
    :param mode: ``resume`` or ``weights``.
    :param epochs: full epochs the parent trained (Lightning's count); None when not read (a requeue).
    :param global_step: the parent's optimizer steps; None when not read.
    """

    path: Path
    mode: str
    epochs: int | None
    global_step: int | None

    def summary(self, job: JobDir) -> dict[str, Any]:
        """The manifest's ``training.init_from``."""
        return {"path": job.relative(self.path), "mode": self.mode, "parent_epochs": self.epochs,
                "parent_global_step": self.global_step}


def epochs_trained(checkpoint: dict[str, Any]) -> int:
    """Full training epochs behind a Lightning checkpoint.

    A checkpoint saved at an epoch's end has that epoch ``processed`` but not yet ``completed``
    (Lightning finishes the bookkeeping when it resumes); one saved mid-epoch (preemption) has the
    running epoch neither. ``processed`` is the count either way.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    if "processed" in progress:
        return int(progress["processed"])
    return int(checkpoint.get("epoch", -1)) + 1


def recorded_init_checkpoint(job: JobDir, path: str, mode: str) -> InitCheckpoint:
    """``run.init_from`` as a requeued attempt records it: for the manifest only, the file not read
    (the attempt resumes from its own checkpoint; a big parent checkpoint is not loaded twice)."""
    file = Path(path) if Path(path).is_absolute() else job.root / path
    return InitCheckpoint(file, mode, None, None)


def load_init_checkpoint(job: JobDir, path: str, mode: str, max_epochs: int | None) -> InitCheckpoint:
    """Read and check ``run.init_from`` before any compute.

    :param job: this job's directory (relative ``path`` resolves against it).
    :param path: the checkpoint.
    :param mode: ``resume`` or ``weights``.
    :param max_epochs: ``trainer.max_epochs`` (``None``/-1: no epoch limit).
    :raises ConfigError: missing or unreadable file, or (resume) a parent at ``max_epochs`` already.
    """
    file = Path(path) if Path(path).is_absolute() else job.root / path
    if not file.is_file():
        raise ConfigError(f"run.init_from={path}: no checkpoint at {file}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"run.init_from={path}: not a readable Lightning checkpoint: {exc}") from exc
    if "state_dict" not in checkpoint:
        raise ConfigError(f"run.init_from={path}: not a Lightning checkpoint (no state_dict)")
    init = InitCheckpoint(file, mode, epochs_trained(checkpoint), int(checkpoint.get("global_step", 0)))
    if mode == "resume" and max_epochs is not None and max_epochs >= 0 and max_epochs <= init.epochs:
        raise ConfigError(
            f"trainer.max_epochs={max_epochs} is already reached: the checkpoint run.init_from={path} has "
            f"trained {init.epochs} epoch(s), and max_epochs counts all epochs, the parent's included (as "
            f"Lightning does). Set max_epochs above {init.epochs} to train more, or use init_mode=weights "
            "to start a fresh schedule from its weights")
    return init


class InitWeights(Callback):
    """``init_mode: weights``: the parent's model weights, loaded once the model is built.

    ``on_fit_start`` runs after ``configure_model`` (layers built from the data's shapes) and the
    optimizer's creation; the copy is in place, so the fresh optimizer holds the same tensors.
    Metric accumulators are not weights and are left as they are.

    :param init: the checkpoint.
    """

    def __init__(self, init: InitCheckpoint) -> None:
        self.init = init

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = torch.load(self.init.path, map_location="cpu", weights_only=True)["state_dict"]
        weights = {k: v for k, v in state.items() if not k.startswith(_METRIC_STATE_PREFIXES)}
        try:
            missing, unexpected = pl_module.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # shape mismatch: another architecture
            raise ConfigError(f"run.init_from={self.init.path} does not fit this model: {exc}") from exc
        missing = [k for k in missing if not k.startswith(_METRIC_STATE_PREFIXES)]
        if missing or unexpected:
            raise ConfigError(
                f"run.init_from={self.init.path} does not fit this model: missing {missing[:5]}, "
                f"unexpected {list(unexpected)[:5]} (was it trained with another model config?)")
