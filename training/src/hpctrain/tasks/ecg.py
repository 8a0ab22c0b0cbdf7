"""A 1-D CNN that classifies ECG rhythms: the worked "add your own model" example.

A task is a :class:`~hpctrain.tasks.base.TaskModule`: it declares its architecture arguments in
``__init__`` (each becomes a ``--model.<name>`` flag and a config key), builds its layers in
``build`` once the data has told it the shapes in :attr:`shape_keys`, and says how to compute
the loss and the metrics. Optimizer, schedule, logging, checkpoints and export come from the base
class (training/README.md, "Add your own model").
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from hpctrain.errors import ConfigError
from hpctrain.tasks.base import LrSchedule, TaskModule


def _conv(c_in: int, c_out: int, kernel: int, dropout: float) -> nn.Sequential:
    # Strided convolutions instead of pooling: deterministic on GPUs too (deterministic: true).
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False),
                         nn.BatchNorm1d(c_out), nn.ReLU(inplace=True), nn.Dropout(dropout))


class ECGClassifier(TaskModule):
    """Rhythm class of a single-lead recording: strided 1-D convolutions, global average, linear head.

    :param width: channels of the first convolution (doubled at each later one).
    :param depth: number of strided convolutions (each halves the time axis).
    :param kernel_size: kernel of the first convolution (odd; later ones use 5).
    :param dropout: dropout after each convolution.
    :param in_channels: leads (default: from the data).
    :param num_classes: classes (default: from the data).
    :param lr: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param weight_decay: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param lr_schedule: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param warmup_steps: see :class:`~hpctrain.tasks.base.TaskModule`.
    """

    monitor: ClassVar[str] = "val/accuracy"
    monitor_mode: ClassVar = "max"
    shape_keys: ClassVar[tuple[str, ...]] = ("in_channels", "num_classes")

    def __init__(
        self,
        width: int = 16,
        depth: int = 4,
        kernel_size: int = 9,
        dropout: float = 0.1,
        in_channels: int | None = None,
        num_classes: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        lr_schedule: LrSchedule = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        if width < 1 or depth < 1:
            raise ConfigError(f"model.width and model.depth must be >= 1, got {width}, {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size must be odd, got {kernel_size}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        # Shapes the data decides are hyperparameters only once known (see SurrogateRegressor).
        shapes = {"in_channels": in_channels, "num_classes": num_classes}
        self.save_hyperparameters(ignore=[k for k, v in shapes.items() if v is None])
        self._maybe_build()

    def build(self) -> None:
        hp = self.hparams
        width, c_in = int(hp["width"]), int(hp["in_channels"])
        layers, channels = [], c_in
        for level in range(int(hp["depth"])):
            out = width * 2 ** min(level, 3)
            layers.append(_conv(channels, out, int(hp["kernel_size"]) if level == 0 else 5, float(hp["dropout"])))
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, int(hp["num_classes"]))
        # Standardization travels with the weights: the exported model takes raw signals.
        self.register_buffer("signal_mean", torch.zeros(()))
        self.register_buffer("signal_std", torch.ones(()))

    def set_data_statistics(self, dims: dict[str, Any]) -> None:
        for name in ("signal_mean", "signal_std"):
            if name in dims:
                getattr(self, name).fill_(float(dims[name]))

    def build_metrics(self) -> MetricCollection:
        n = int(self.hparams["num_classes"])
        return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
                                 "f1": MulticlassF1Score(num_classes=n, average="macro")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, classes]`` from raw signals ``[batch, leads, samples]``."""
        x = (x - self.signal_mean) / self.signal_std
        return self.head(self.features(x).mean(dim=-1))

    def loss_and_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits.detach(), y
