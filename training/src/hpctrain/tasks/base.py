"""What every hpctrain LightningModule shares: optimizer/schedule, data-derived shapes, metrics.

A task knows its architecture hyperparameters from the config but not the shapes the data
decides (input width, channels, classes) nor data statistics (standardization, class weights).
:meth:`TaskModule.configure_model` takes both from the data module's ``model_dims()``; shapes are
written back into ``hparams`` (so checkpoints and exports rebuild the same network) and statistics
into buffers (so the exported model takes raw inputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from hpctrain.errors import ConfigError

LrSchedule = Literal["constant", "cosine"]


class TaskModule(LightningModule):
    """Base class of the models the ``hpctrain`` command line accepts.

    :param lr: peak learning rate of AdamW.
    :param weight_decay: AdamW weight decay.
    :param lr_schedule: ``constant``, or ``cosine`` decay to zero over the whole run (per step).
    :param warmup_steps: linear warm-up steps before the schedule.
    """

    #: metric that decides the best checkpoint, and whether lower or higher is better
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[Literal["min", "max"]] = "min"
    #: hyperparameters the data decides when the config leaves them unset
    shape_keys: ClassVar[tuple[str, ...]] = ()
    #: the MLPerf HPC benchmark this task stands in for (its runs write ``mlperf.log``), if any
    mlperf_benchmark: ClassVar[str | None] = None

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LrSchedule = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.built = False

    # -- what subclasses provide ------------------------------------------------------------
    def build(self) -> None:
        """Create the layers (all :attr:`shape_keys` are in ``self.hparams`` by now)."""
        raise NotImplementedError

    def set_data_statistics(self, dims: dict[str, Any]) -> None:
        """Copy data statistics (standardization, class weights) into buffers."""

    def build_metrics(self) -> MetricCollection:
        """Fresh metrics for validation/evaluation, keyed without the ``val/`` prefix."""
        raise NotImplementedError

    def loss_and_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, predictions for metrics, targets for metrics)`` of one batch."""
        raise NotImplementedError

    # -- shapes from the data ---------------------------------------------------------------
    def _maybe_build(self) -> None:
        if not self.built and all(self.hparams.get(k) is not None for k in self.shape_keys):
            self.build()
            self.val_metrics = self.build_metrics()
            self.val_loss = MeanMetric()
            self.train_loss = MeanMetric()
            # Part of the checkpoint, so the epoch mean of a resumed epoch covers all its steps.
            self.train_loss.persistent(True)
            self.built = True

    def adopt_data_dims(self, dims: dict[str, Any]) -> None:
        """Fill unset shape hyperparameters from the data, check set ones, build, load statistics.

        :param dims: the data module's :meth:`~hpctrain.data.base.HpcDataModule.model_dims`.
        :raises ConfigError: when a configured shape contradicts the data.
        """
        for key in self.shape_keys:
            given, actual = self.hparams.get(key), dims.get(key)
            if actual is None:
                continue
            if given is None:
                self.hparams[key] = int(actual)
            elif int(given) != int(actual):
                raise ConfigError(f"model.{key}={given} but the data provides {actual}")
        self._maybe_build()
        if not self.built:
            missing = [k for k in self.shape_keys if self.hparams.get(k) is None]
            raise ConfigError(f"model: {missing} unset and not provided by the data module")
        self.set_data_statistics(dims)

    def configure_model(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "model_dims"):
            self.adopt_data_dims(datamodule.model_dims())
        else:
            self._maybe_build()

    # -- Lightning hooks ----------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.loss_and_outputs(batch)
        self.train_loss.update(loss.detach(), weight=len(batch[0]))
        if self._step_is_logged():
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _step_is_logged(self) -> bool:
        # self.log costs ~0.3 ms on a slow CPU (Lightning walks its result collection each call);
        # only call it on steps the logger will record (Lightning's own rule: every
        # log_every_n_steps optimizer steps) or when a progress bar shows it.
        trainer = self.trainer
        if trainer.progress_bar_callback is not None or trainer.fast_dev_run:
            return True
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0

    def on_train_epoch_end(self) -> None:
        # Logged once per epoch rather than as a Metric object every step: Lightning moves a
        # logged Metric to the device on each self.log call, which costs ~0.5 ms per step.
        self.log("train/loss_epoch", self.train_loss.compute(), sync_dist=False)
        self.train_loss.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, target = self.loss_and_outputs(batch)
        self.val_loss.update(loss, weight=len(batch[0]))
        self.val_metrics.update(preds, target)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        # Metric objects compute over the whole epoch (and sync across DDP ranks) at epoch end.
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, sync_dist=False)
        self.val_metrics.reset()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, cosine = self.warmup_steps, self.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation outside a Trainer -----------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Validation metrics over ``batches`` (e.g. a held-out loader), named ``val/...``.

        :param batches: an iterable of ``(inputs, targets)`` batches.
        """
        was_training = self.training
        self.eval()
        metrics, loss_mean = self.build_metrics().to(self.device), MeanMetric().to(self.device)
        for batch in batches:
            batch = [t.to(self.device) for t in batch]
            loss, preds, target = self.loss_and_outputs(batch)
            loss_mean.update(loss, weight=len(batch[0]))
            metrics.update(preds, target)
        self.train(was_training)
        result = {"val/loss": float(loss_mean.compute())}
        result.update({f"val/{k}": float(v) for k, v in metrics.compute().items()})
        return result

    def export_init_args(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (plain types only)."""
        return {k: v for k, v in dict(self.hparams).items() if not k.startswith("_")}


def activation(name: str) -> nn.Module:
    """``relu``/``gelu``/``silu``/``tanh`` as a module."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
    if name not in table:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()
