"""Tabular surrogate regressor: an MLP that stands in for an expensive simulation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from hpctrain.errors import ConfigError
from hpctrain.tasks.base import LrSchedule, TaskModule, activation


class SurrogateRegressor(TaskModule):
    """MLP from standardized inputs to standardized targets; ``forward`` works in raw units.

    The training loss is the MSE in standardized target space (well conditioned whatever the
    units); ``val/rmse``, ``val/mae`` and ``val/r2`` are in the targets' own units.

    :param hidden_sizes: widths of the hidden layers, e.g. ``[256, 256, 128]``.
    :param activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    :param dropout: dropout after each hidden layer.
    :param in_features: number of features (default: from the data).
    :param out_features: number of targets (default: from the data).
    :param lr: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param weight_decay: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param lr_schedule: see :class:`~hpctrain.tasks.base.TaskModule`.
    :param warmup_steps: see :class:`~hpctrain.tasks.base.TaskModule`.
    """

    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar = "min"
    shape_keys: ClassVar[tuple[str, ...]] = ("in_features", "out_features")

    def __init__(
        self,
        hidden_sizes: list[int] | None = None,
        activation: str = "silu",
        dropout: float = 0.0,
        in_features: int | None = None,
        out_features: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LrSchedule = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        hidden_sizes = [128, 128] if hidden_sizes is None else list(hidden_sizes)
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ConfigError(f"model.hidden_sizes must be positive widths, got {hidden_sizes}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        # Shapes left to the data are not hyperparameters yet: Lightning logs hparams to MLflow
        # before the data is read, and MLflow params cannot change once logged as "None".
        shapes = {"in_features": in_features, "out_features": out_features}
        self.save_hyperparameters(ignore=[k for k, v in shapes.items() if v is None])
        self.hparams["hidden_sizes"] = hidden_sizes
        self._maybe_build()

    def build(self) -> None:
        hp = self.hparams
        layers: list[nn.Module] = []
        width = int(hp["in_features"])
        for hidden in hp["hidden_sizes"]:
            layers += [nn.Linear(width, hidden), activation(hp["activation"])]
            if hp["dropout"]:
                layers.append(nn.Dropout(hp["dropout"]))
            width = hidden
        layers.append(nn.Linear(width, int(hp["out_features"])))
        self.net = nn.Sequential(*layers)
        # Standardization statistics travel with the weights (state_dict), so an exported model
        # takes raw features and returns raw targets.
        n_in, n_out = int(hp["in_features"]), int(hp["out_features"])
        self.register_buffer("x_mean", torch.zeros(n_in))
        self.register_buffer("x_std", torch.ones(n_in))
        self.register_buffer("y_mean", torch.zeros(n_out))
        self.register_buffer("y_std", torch.ones(n_out))

    def set_data_statistics(self, dims: dict[str, Any]) -> None:
        for name in ("x_mean", "x_std", "y_mean", "y_std"):
            if name in dims:
                getattr(self, name).copy_(torch.as_tensor(dims[name], dtype=torch.float32))

    def build_metrics(self) -> MetricCollection:
        n_out = int(self.hparams["out_features"])
        return MetricCollection(
            {
                "rmse": MeanSquaredError(squared=False, num_outputs=n_out),
                "mae": MeanAbsoluteError(),
                "r2": R2Score(multioutput="uniform_average") if n_out > 1 else R2Score(),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict raw targets ``[batch, out_features]`` from raw features ``[batch, in_features]``."""
        return self.net((x - self.x_mean) / self.x_std) * self.y_std + self.y_mean

    def loss_and_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        pred_std = self.net((x - self.x_mean) / self.x_std)
        loss = F.mse_loss(pred_std, (y - self.y_mean) / self.y_std)
        pred = pred_std.detach() * self.y_std + self.y_mean
        if pred.shape[1] == 1:  # torchmetrics wants 1-D for a single output
            return loss, pred.squeeze(1), y.squeeze(1)
        return loss, pred, y
