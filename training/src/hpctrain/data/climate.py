"""Synthetic climate fields for segmentation, in the spirit of DeepCam (MLPerf HPC).

DeepCam segments tropical cyclones and atmospheric rivers in CAM5 reanalysis snapshots. Nothing
can be downloaded on the compute nodes (or here), so this module generates snapshots with the same
structure, deterministically from a seed: four channels (``TMQ`` precipitable water, ``U850`` and
``V850`` winds, ``PSL`` sea-level pressure) over a latitude/longitude grid, with

* a smooth large-scale background (moist tropics, random planetary-scale waves, noise),
* tropical cyclones: compact pressure lows with a moist core and a cyclonic wind vortex,
* atmospheric rivers: long, narrow, tilted filaments of moisture with along-band wind,

and per-pixel labels 0 = background, 1 = tropical cyclone, 2 = atmospheric river. Sample ``i`` of
seed ``s`` is a pure function of ``(s, i)``, so a data set is identified by its parameters (and the
SHA-256 of the generated tensors, recorded as a check).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from hpctrain.data.base import HpcDataModule
from hpctrain.data.identity import hash_tensors
from hpctrain.data.tensor_table import TensorTable
from hpctrain.errors import ConfigError

CHANNELS = ("TMQ", "U850", "V850", "PSL")
CLASSES = ("background", "tropical_cyclone", "atmospheric_river")
GENERATOR_VERSION = "hpctrain.data.climate/v1"


def _background(gen: torch.Generator, height: int, width: int) -> torch.Tensor:
    lat = torch.linspace(-1.0, 1.0, height).unsqueeze(1).expand(height, width)
    coarse = torch.randn(len(CHANNELS), 1, max(2, height // 8), max(2, width // 8), generator=gen)
    waves = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
    fields = 0.6 * waves + 0.1 * torch.randn(len(CHANNELS), height, width, generator=gen)
    fields[0] += 1.5 * torch.exp(-4.0 * lat**2)  # moist tropics
    fields[1] += 0.8 * torch.sin(math.pi * lat)  # westerlies / trade winds
    return fields


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(height, dtype=torch.float32).unsqueeze(1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).unsqueeze(0).expand(height, width)
    return ys, xs


def _add_cyclone(fields: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> None:
    _, height, width = fields.shape
    ys, xs = _grid(height, width)
    scale = min(height, width) / 64.0
    radius = float(torch.empty(1).uniform_(3.0, 5.5, generator=gen)) * scale
    cy = float(torch.empty(1).uniform_(0.2 * height, 0.8 * height, generator=gen))
    cx = float(torch.empty(1).uniform_(radius, width - radius, generator=gen))
    dy, dx = ys - cy, xs - cx
    dist = torch.sqrt(dy**2 + dx**2) + 1e-6
    core = torch.exp(-(dist**2) / (2 * radius**2))
    # Cyclonic (counter-clockwise in the north, clockwise in the south) tangential wind.
    hemisphere = 1.0 if cy < height / 2 else -1.0
    speed = 3.0 * (dist / radius) * torch.exp(1.0 - dist / radius)
    fields[0] += 2.5 * core
    fields[1] += hemisphere * speed * (-dy / dist)
    fields[2] += hemisphere * speed * (dx / dist)
    fields[3] -= 3.0 * core
    labels[core > 0.3] = 1


def _add_river(fields: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> None:
    _, height, width = fields.shape
    ys, xs = _grid(height, width)
    scale = min(height, width) / 64.0
    angle = float(torch.empty(1).uniform_(0.25, 0.75, generator=gen)) * math.pi / 2
    half_width = float(torch.empty(1).uniform_(1.5, 2.5, generator=gen)) * scale
    length = float(torch.empty(1).uniform_(0.45, 0.75, generator=gen)) * width
    cy = float(torch.empty(1).uniform_(0.25 * height, 0.75 * height, generator=gen))
    cx = float(torch.empty(1).uniform_(0.3 * width, 0.7 * width, generator=gen))
    along = (xs - cx) * math.cos(angle) - (ys - cy) * math.sin(angle)
    across = (xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    band = torch.exp(-(across**2) / (2 * half_width**2)) * torch.sigmoid(
        (length / 2 - along.abs()) / (2 * scale)
    )
    fields[0] += 2.0 * band
    fields[1] += 2.0 * band * math.cos(angle)
    fields[2] -= 2.0 * band * math.sin(angle)
    labels[(band > 0.4) & (labels == 0)] = 2


def generate_sample(
    seed: int, index: int, height: int = 64, width: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """One snapshot: ``(fields [4, H, W] float32, labels [H, W] int64)``.

    :param seed: data set seed.
    :param index: sample number; each ``(seed, index)`` pair has its own generator stream.
    :param height: grid rows (latitudes).
    :param width: grid columns (longitudes).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    fields = _background(gen, height, width)
    labels = torch.zeros(height, width, dtype=torch.int64)
    n_cyclones = int(torch.randint(0, 3, (1,), generator=gen))
    has_river = bool(torch.rand(1, generator=gen) < 0.7)
    if has_river:
        _add_river(fields, labels, gen)
    for _ in range(n_cyclones):
        _add_cyclone(fields, labels, gen)
    return fields, labels


def generate(
    seed: int, num_samples: int, height: int = 64, width: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack :func:`generate_sample` for indices ``0..num_samples-1``."""
    pairs = [generate_sample(seed, i, height, width) for i in range(num_samples)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class ClimateSegmentationDataModule(HpcDataModule):
    """DeepCam-like segmentation data generated from a seed (nothing is downloaded).

    :param num_samples: snapshots in the data set; the last ``val_fraction`` are validation.
    :param height: grid rows.
    :param width: grid columns.
    :param seed: data set seed (independent of the training seed: sweeps share the data).
    :param val_fraction: share of snapshots held out.
    :param batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param eval_batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param num_workers: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param shuffle_seed: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param cache_dir: unused (generation is cheap); accepted for a uniform interface.
    """

    def __init__(
        self,
        num_samples: int = 512,
        height: int = 64,
        width: int = 64,
        seed: int = 0,
        val_fraction: float = 0.25,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, cache_dir)
        if num_samples < 2:
            raise ConfigError("data.num_samples must be >= 2")
        if height < 16 or width < 16 or height % 4 or width % 4:
            raise ConfigError(
                "data.height/width must be multiples of 4 and >= 16 (the CNN downsamples twice)"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.num_samples = num_samples
        self.height = height
        self.width = width
        self.seed = seed
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        x, y = generate(self.seed, self.num_samples, self.height, self.width)
        n_val = int(round(self.num_samples * self.val_fraction))
        n_train = self.num_samples - n_val
        self._splits = {
            "train": TensorTable(x[:n_train], y[:n_train]),
            "val": TensorTable(x[n_train:], y[n_train:]),
            "all": TensorTable(x, y),
        }
        train_x, train_y = x[:n_train], y[:n_train]
        counts = torch.bincount(train_y.flatten(), minlength=len(CLASSES)).float()
        self._stats = {
            "channel_mean": train_x.mean(dim=(0, 2, 3)),
            "channel_std": train_x.std(dim=(0, 2, 3)).clamp_min(1e-6),
            # Inverse-frequency class weights (DeepCam weights its loss the same way): cyclones
            # cover about 1% of the pixels and would otherwise be ignored.
            "class_weights": (counts.sum() / (len(CLASSES) * counts.clamp_min(1.0))).sqrt(),
        }
        self._identity = {
            "kind": "synthetic",
            "generator": GENERATOR_VERSION,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "height": self.height,
            "width": self.width,
            "channels": list(CHANNELS),
            "classes": list(CLASSES),
            "train_samples": n_train,
            "val_samples": n_val,
            "sha256": hash_tensors(x, y),
        }

    def model_dims(self) -> dict[str, Any]:
        return {"in_channels": len(CHANNELS), "num_classes": len(CLASSES), **self._stats}
