"""Stop at a quality target and measure the time to reach it (MLPerf's "time to train").

The clock runs from the start of training (MLPerf's ``run_start``: after the data and model are
set up) to the end of the first validation whose monitored metric reaches the target. It counts
training time only: the seconds each attempt of a requeued job trained are kept in the checkpoint
and added up, so the queue time between attempts is not counted (the steps an attempt redid after
its last checkpoint are: they were spent again).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class TargetStop(Callback):
    """Stop training at the first validation where ``metric`` reaches ``target``.

    With ``target=None`` it only keeps the training clock (nothing stops early).

    :param metric: the monitored metric, e.g. ``val/iou``.
    :param mode: ``max`` (reached when ``value >= target``) or ``min`` (``value <= target``).
    :param target: the quality target, or ``None``.
    """

    def __init__(self, metric: str | None, mode: Literal["min", "max"], target: float | None) -> None:
        self.metric = metric
        self.mode = mode
        self.target = target
        self.time_to_target_s: float | None = None
        self.reached_epoch: int | None = None
        self._elapsed_before = 0.0  # training seconds of earlier attempts (from the checkpoint)
        self._started: float | None = None

    @property
    def reached(self) -> bool:
        return self.time_to_target_s is not None

    def elapsed(self) -> float:
        """Training seconds so far, over all attempts."""
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self._elapsed_before + running

    def is_reached_by(self, value: float) -> bool:
        if self.target is None or not math.isfinite(value):
            return False
        return value >= self.target if self.mode == "max" else value <= self.target

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.target is None or self.metric is None or self.reached:
            return
        value = trainer.callback_metrics.get(self.metric)
        hit = value is not None and self.is_reached_by(float(value.item() if isinstance(value, torch.Tensor) else value))
        # Every rank must stop at the same step (Lightning's EarlyStopping does the same).
        if trainer.strategy.reduce_boolean_decision(hit, all=False):
            self.time_to_target_s = round(self.elapsed(), 3)
            self.reached_epoch = int(trainer.current_epoch)
            trainer.should_stop = True

    def summary(self) -> dict[str, Any]:
        """The manifest's ``target`` section plus ``target_reached`` / ``time_to_target_s``."""
        return {
            "target": {"metric": self.metric, "mode": self.mode, "value": self.target, "epoch": self.reached_epoch}
            if self.target is not None
            else None,
            "target_reached": self.reached if self.target is not None else None,
            "time_to_target_s": self.time_to_target_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed(),
            "time_to_target_s": self.time_to_target_s,
            "reached_epoch": self.reached_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed_before = float(state_dict.get("elapsed_s") or 0.0)
        self.time_to_target_s = state_dict.get("time_to_target_s")
        self.reached_epoch = state_dict.get("reached_epoch")
