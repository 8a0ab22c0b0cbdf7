"""Synthetic ECG-like signals for rhythm classification: the worked "add your own model" example.

Nothing is downloaded: each recording is generated from ``(seed, index)``. A beat is the classic
P-QRS-T complex drawn as a sum of Gaussians; a recording is beats at the rhythm's RR intervals,
plus baseline wander and noise. Four classes, told apart by rate and regularity:

0 ``normal`` (60-100 bpm, regular), 1 ``bradycardia`` (35-55 bpm), 2 ``tachycardia``
(110-170 bpm), 3 ``irregular`` (atrial-fibrillation-like: random RR intervals, no P wave).

This module is all a new data source needs: an :class:`~hpctrain.data.base.HpcDataModule` whose
``setup`` fills ``self._splits`` and ``self._identity``, and whose ``model_dims`` tells the model
the shapes and statistics it cannot know from its config (training/README.md, "Add your own model").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpctrain.data.base import HpcDataModule
from hpctrain.data.identity import hash_tensors
from hpctrain.data.tensor_table import TensorTable
from hpctrain.errors import ConfigError

CLASSES = ("normal", "bradycardia", "tachycardia", "irregular")
GENERATOR_VERSION = "hpctrain.data.ecg/v1"
#: (offset s, amplitude, width s) of the P, Q, R, S and T waves around the R peak
_WAVES = ((-0.20, 0.15, 0.025), (-0.035, -0.12, 0.010), (0.0, 1.0, 0.012), (0.035, -0.25, 0.010),
          (0.25, 0.30, 0.045))
_RATES = {0: (60.0, 100.0), 1: (35.0, 55.0), 2: (110.0, 170.0), 3: (70.0, 140.0)}


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def generate_sample(seed: int, index: int, length: int = 512, sampling_rate: float = 128.0,
                    noise: float = 0.05) -> tuple[torch.Tensor, int]:
    """One recording: ``(signal [1, length] float32, class)``; a pure function of its arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label = int(torch.randint(0, len(CLASSES), (1,), generator=gen))
    t = torch.arange(length, dtype=torch.float32) / sampling_rate
    duration = length / sampling_rate
    rr_mean = 60.0 / _uniform(gen, *_RATES[label])
    beats, at = [], _uniform(gen, -rr_mean, 0.0)
    while at < duration + 0.5:
        beats.append(at)
        jitter = 0.35 if label == 3 else 0.03  # irregular rhythm: RR varies by up to +-35 %
        at += rr_mean * (1.0 + _uniform(gen, -jitter, jitter))
    peaks = torch.tensor(beats).unsqueeze(1)  # [beats, 1]
    signal = torch.zeros(length)
    for k, (offset, amplitude, width) in enumerate(_WAVES):
        if label == 3 and k == 0:
            continue  # no P wave in atrial fibrillation
        signal += (amplitude * torch.exp(-((t - peaks - offset) ** 2) / (2 * width**2))).sum(dim=0)
    wander = 0.1 * torch.sin(2 * math.pi * _uniform(gen, 0.1, 0.5) * t + _uniform(gen, 0.0, 2 * math.pi))
    signal = signal * _uniform(gen, 0.7, 1.3) + wander + noise * torch.randn(length, generator=gen)
    return signal.unsqueeze(0), label


def generate(seed: int, num_samples: int, length: int = 512, sampling_rate: float = 128.0,
             noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack :func:`generate_sample` for indices ``0..num_samples-1``: ``([n, 1, length], [n])``."""
    pairs = [generate_sample(seed, i, length, sampling_rate, noise) for i in range(num_samples)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int64)


class SyntheticECGDataModule(HpcDataModule):
    """Generated single-lead ECG recordings with a rhythm label each.

    :param num_samples: recordings; the last ``val_fraction`` of them are validation.
    :param length: samples per recording.
    :param sampling_rate: samples per second.
    :param noise: standard deviation of the added white noise (mV-like units; R peak ~1).
    :param seed: data set seed (independent of the training seed).
    :param val_fraction: share of recordings held out.
    :param batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param eval_batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param num_workers: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param shuffle_seed: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param cache_dir: unused (generation is cheap); accepted for a uniform interface.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        length: int = 512,
        sampling_rate: float = 128.0,
        noise: float = 0.05,
        seed: int = 0,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, cache_dir)
        if num_samples < 2:
            raise ConfigError("data.num_samples must be >= 2")
        if length < 64:
            raise ConfigError(f"data.length must be >= 64 samples, got {length}")
        if sampling_rate <= 0 or noise < 0:
            raise ConfigError("data.sampling_rate must be > 0 and data.noise >= 0")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.num_samples, self.length, self.sampling_rate = num_samples, length, sampling_rate
        self.noise, self.seed, self.val_fraction = noise, seed, val_fraction
        self._stats: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        x, y = generate(self.seed, self.num_samples, self.length, self.sampling_rate, self.noise)
        n_val = max(1, int(round(self.num_samples * self.val_fraction)))
        n_train = self.num_samples - n_val
        self._splits = {
            "train": TensorTable(x[:n_train], y[:n_train]),
            "val": TensorTable(x[n_train:], y[n_train:]),
            "all": TensorTable(x, y),
        }
        # From the training split only, so validation stays unseen; the model keeps them as buffers.
        self._stats = {"signal_mean": float(x[:n_train].mean()), "signal_std": float(x[:n_train].std())}
        self._identity = {
            "kind": "synthetic", "generator": GENERATOR_VERSION, "seed": self.seed,
            "num_samples": self.num_samples, "length": self.length, "sampling_rate": self.sampling_rate,
            "noise": self.noise, "classes": list(CLASSES), "train_samples": n_train, "val_samples": n_val,
            "sha256": hash_tensors(x, y),
        }

    def model_dims(self) -> dict[str, Any]:
        return {"in_channels": 1, "num_classes": len(CLASSES), **self._stats}
