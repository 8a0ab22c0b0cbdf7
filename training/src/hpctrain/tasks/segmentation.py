"""Climate-pattern segmentation: a small U-Net in the spirit of DeepCam."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from hpctrain.errors import ConfigError
from hpctrain.tasks.base import LrSchedule, TaskModule


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _ClassIoU(MulticlassJaccardIndex):
    """IoU of one class (torchmetrics gives per-class values only as a vector)."""

    def __init__(self, num_classes: int, index: int) -> None:
        super().__init__(num_classes=num_classes, average="none")
        self.index = index

    def compute(self) -> torch.Tensor:
        return super().compute()[self.index]


class ClimateSegmenter(TaskModule):
    """Two-level U-Net: per-pixel background / tropical cyclone / atmospheric river.

    Upsampling uses transposed convolutions and the weighted cross-entropy is written out by hand
    (masked sum, no gather): both are deterministic on GPUs too, where ``F.interpolate`` backward
    and weighted ``F.cross_entropy`` are not, so ``deterministic: true`` stays affordable.

    :param width: channels of the first level (doubled at each level down).
    :param in_channels: input fields (default: from the data).
    :param num_classes: classes (default: from the data).
    :param class_weighting: weight the loss by the data module's inverse class frequencies.
    :param lr: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param weight_decay: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param lr_schedule: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param warmup_steps: see :class:`~hpctrain.tasks.base.TaskModule`.
    """

    monitor: ClassVar[str] = "val/iou"
    monitor_mode: ClassVar = "max"
    shape_keys: ClassVar[tuple[str, ...]] = ("in_channels", "num_classes")
    mlperf_benchmark: ClassVar[str | None] = "deepcam"

    def __init__(
        self,
        width: int = 16,
        in_channels: int | None = None,
        num_classes: int | None = None,
        class_weighting: bool = True,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        lr_schedule: LrSchedule = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        if width < 1:
            raise ConfigError(f"model.width must be >= 1, got {width}")
        shapes = {"in_channels": in_channels, "num_classes": num_classes}  # see SurrogateRegressor
        self.save_hyperparameters(ignore=[k for k, v in shapes.items() if v is None])
        self._maybe_build()

    def build(self) -> None:
        w, c_in, n_cls = (
            int(self.hparams["width"]),
            int(self.hparams["in_channels"]),
            int(self.hparams["num_classes"]),
        )
        self.enc1, self.enc2, self.mid = _block(c_in, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, n_cls, 1)
        self.register_buffer("channel_mean", torch.zeros(c_in))
        self.register_buffer("channel_std", torch.ones(c_in))
        self.register_buffer("class_weights", torch.ones(n_cls))

    def set_data_statistics(self, dims: dict[str, Any]) -> None:
        for name in ("channel_mean", "channel_std", "class_weights"):
            if name in dims:
                getattr(self, name).copy_(torch.as_tensor(dims[name], dtype=torch.float32))
        if not self.hparams["class_weighting"]:
            self.class_weights.fill_(1.0)

    def build_metrics(self) -> MetricCollection:
        n = int(self.hparams["num_classes"])
        metrics: dict[str, Any] = {
            "iou": MulticlassJaccardIndex(num_classes=n, average="macro"),
            "accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
        }
        if n == 3:
            metrics["iou_cyclone"] = _ClassIoU(n, 1)
            metrics["iou_river"] = _ClassIoU(n, 2)
        return MetricCollection(metrics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, classes, H, W]`` from raw fields ``[batch, channels, H, W]``."""
        x = (x - self.channel_mean[:, None, None]) / self.channel_std[:, None, None]
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)

    def loss_and_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        # The true class's log-probability as a masked sum rather than gather: gather's backward
        # is a scatter-add, which is not deterministic on GPUs.
        one_hot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        log_probs = (F.log_softmax(logits, dim=1) * one_hot).sum(dim=1)
        weights = self.class_weights[y]
        loss = -(weights * log_probs).sum() / weights.sum()
        return loss, logits.detach().argmax(dim=1), y
