"""Which producer rank drew a sample: the classifier of the online-training reference workflow.

The seed's SmartSim tutorial trains a network to tell, from a sample, which rank of the
simulation produced it (rank ``r`` draws from a Gaussian centred at ``r``). Here an MLP does that on
batches streamed by :mod:`hpctrain.produce` through :class:`hpctrain.data.online.OnlineDataModule`,
whose training rows carry a weight (0 for the padding that keeps DDP ranks in step).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from hpctrain.errors import ConfigError
from hpctrain.tasks.base import LrSchedule, TaskModule, activation


class OnlineClassifier(TaskModule):
    """An MLP over flattened samples; the loss ignores zero-weight (padding) rows.

    :param hidden_sizes: widths of the hidden layers.
    :param activation_name: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    :param in_features: values per sample (default: from the data).
    :param num_classes: classes (default: from the data = ranks per replica).
    :param lr: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param weight_decay: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param lr_schedule: see :class:`~hpctrain.tasks.base.TaskModule` (``constant`` suits a data set
        whose size is unknown in advance).
    :param warmup_steps: see :class:`~hpctrain.tasks.base.TaskModule`.
    """

    monitor: ClassVar[str] = "val/accuracy"
    monitor_mode: ClassVar = "max"
    shape_keys: ClassVar[tuple[str, ...]] = ("in_features", "num_classes")

    def __init__(
        self,
        hidden_sizes: list[int] | None = None,
        activation_name: str = "relu",
        in_features: int | None = None,
        num_classes: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        lr_schedule: LrSchedule = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        hidden_sizes = [64] if hidden_sizes is None else list(hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ConfigError(f"model.hidden_sizes must be positive, got {hidden_sizes}")
        activation(activation_name)  # unknown names fail here, before any data is read
        shapes = {"in_features": in_features, "num_classes": num_classes}
        self.save_hyperparameters(ignore=[k for k, v in shapes.items() if v is None])
        self.hparams["hidden_sizes"] = hidden_sizes
        self._maybe_build()

    def build(self) -> None:
        hp = self.hparams
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(hp["in_features"])
        for size in hp["hidden_sizes"]:
            layers += [nn.Linear(width, int(size)), activation(hp["activation_name"])]
            width = int(size)
        layers.append(nn.Linear(width, int(hp["num_classes"])))
        self.net = nn.Sequential(*layers)
        self.train_accuracy = MulticlassAccuracy(num_classes=int(hp["num_classes"]), average="micro")

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=int(self.hparams["num_classes"]),
                                                                average="micro")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, classes]`` from samples ``[batch, *sample_shape]``."""
        return self.net(x)

    def loss_and_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, *rest = batch
        logits = self(x)
        if not rest:
            return F.cross_entropy(logits, y), logits.detach(), y
        weight = rest[0]
        # The padding rows count for nothing; a step of padding only still runs (DDP needs it).
        loss = (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)
        return loss, logits.detach(), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self.loss_and_outputs(batch)
        real = batch[2] > 0 if len(batch) > 2 else torch.ones_like(y, dtype=torch.bool)
        self.train_loss.update(loss.detach(), weight=float(real.sum()))
        if real.any():
            self.train_accuracy.update(logits[real], y[real])
        if self._step_is_logged():
            self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # torchmetrics sums over the DDP ranks in compute()
        self.log("train/accuracy", self.train_accuracy.compute(), sync_dist=False)
        self.train_accuracy.reset()
