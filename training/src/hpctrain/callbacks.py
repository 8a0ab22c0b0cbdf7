"""Callbacks that make a resumed run continue exactly where the interrupted one stopped."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from hpctrain.data.sampling import ResumableLoader
from hpctrain.job import read_json, write_json_atomic


def _capture_rng() -> dict[str, Any]:
    # Plain types and tensors only: checkpoints load with torch.load(weights_only=True).
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeStateCallback(Callback):
    """Restore what Lightning's own restore misses, so a resumed run continues bit for bit.

    * The global RNG streams (torch, CUDA, numpy, python): Lightning does not checkpoint them, and
      without them dropout masks after a resume differ from the uninterrupted run's.
    * The training loader's position (:class:`~hpctrain.data.sampling.ResumableLoader`):
      Lightning checkpoints it, but loads it back only if the train loader is first built after
      the restore; a ``configure_optimizers`` that asks for ``estimated_stepping_batches`` (ours,
      for the cosine schedule) builds it before, and the saved position is silently dropped.

    Both are applied at ``on_train_start``: after the restore, the sanity check and the loader
    setup (which may draw random numbers), and before the first resumed batch is fetched.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = fit_loop.get("state_dict", {}).get("combined_loader")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loader_states:
            loaders = [dl for dl in _flatten(trainer.train_dataloader) if isinstance(dl, ResumableLoader)]
            for loader, state in zip(loaders, self._loader_states, strict=False):
                loader.load_state_dict(state)
            self._loader_states = None
        if self._rng is not None:
            _restore_rng(self._rng)
            self._rng = None


def _flatten(loaders: Any) -> list[Any]:
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, list | tuple):
        return [x for v in loaders for x in _flatten(v)]
    return [] if loaders is None else [loaders]


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
            if math.isfinite(number):
                out[key] = number
    return out


class EpochHistory(Callback):
    """Per-epoch metric rows (``epoch``, ``step``, ``val/*``, ``train/loss_epoch``) for the manifest.

    Kept in checkpoints so the history of a requeued job covers all its attempts.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def _row(self, epoch: int) -> dict[str, Any]:
        for row in self.rows:
            if row["epoch"] == epoch:
                return row
        self.rows.append({"epoch": epoch})
        return self.rows[-1]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = self._row(trainer.current_epoch)
        row.update(_floats(trainer.callback_metrics, "val/"))
        row["step"] = trainer.global_step

    def _record_train_loss(self, trainer: pl.Trainer, epoch: int) -> None:
        # The task logs train/loss_epoch in its own on_train_epoch_end, which Lightning calls
        # after the callbacks' hook: the value of epoch e is visible from the start of e + 1.
        if epoch < 0 or "train/loss_epoch" not in trainer.callback_metrics:
            return
        row = self._row(epoch)
        row.setdefault("step", trainer.global_step)
        row.update(_floats(trainer.callback_metrics, "train/loss_epoch"))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_train_loss(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_train_loss(trainer, trainer.current_epoch - 1)

    def best(self, monitor: str, mode: str) -> dict[str, Any] | None:
        """The row with the best ``monitor`` value (``None`` if never validated)."""
        rows = [r for r in self.rows if monitor in r]
        if not rows:
            return None
        pick = min if mode == "min" else max
        return dict(pick(rows, key=lambda r: r[monitor]))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


class AttemptLog(Callback):
    """Where each attempt of a job started and stopped, across requeues (``training.attempts``).

    One row per attempt: ``restart`` (``SLURM_RESTART_COUNT``), ``start_step`` (the global step it
    resumed at, ``None`` if it stopped before training started), ``end_step`` and ``status``
    (``running`` until it stops; a row left ``running`` is an attempt killed without a checkpoint).
    The steps an attempt trained again are the previous row's ``end_step`` minus its
    ``start_step``: 0 after a preemption checkpoint, at most one checkpoint interval otherwise.
    Rows live in a file of the job directory, not in checkpoints, so that an attempt killed before
    it could save still leaves its row. Rank 0 writes.

    :param path: the rows' file (``<job_dir>/.hpctrain/attempts.json``).
    :param restart: this attempt's restart count.
    """

    def __init__(self, path: str | os.PathLike[str], restart: int) -> None:
        self.path = Path(path)
        self.restart = restart
        self._started = False

    def rows(self) -> list[dict[str, Any]]:
        rows = read_json(self.path)
        return rows if isinstance(rows, list) else []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the preemption callback's on_train_start, which may stop the attempt right here.
        if not trainer.is_global_zero:
            return
        row = {"restart": self.restart, "start_step": int(trainer.global_step), "end_step": None, "status": "running"}
        write_json_atomic(self.path, [*self.rows(), row])
        self._started = True

    def finish(self, status: str, step: int) -> list[dict[str, Any]]:
        """Close this attempt's row (rank 0 only) and return every row."""
        rows = self.rows()
        if self._started and rows:
            rows[-1].update(end_step=int(step), status=status)
        else:
            rows.append({"restart": self.restart, "start_step": None, "end_step": None, "status": status})
        write_json_atomic(self.path, rows)
        return rows
