"""Training throughput: the hpctrain Lightning task vs a hand-written PyTorch loop.

Same model (``SurrogateRegressor``), same data (borehole table), same sampler, batch size,
optimizer (AdamW) and per-step cosine schedule; only the driver differs. Both run in this process,
interleaved (Lightning, plain, Lightning, ...) so that drift in machine load hits both alike; each
figure is the median over ``--repeats``. Throughput is measured in steady state: the first
``--warmup`` steps of every repeat are excluded, and so are Trainer construction and setup.

What the Lightning side has switched off, as in any throughput measurement: progress bar, loggers,
checkpointing, model summary, sanity validation and validation (``limit_val_batches=0``). What it
keeps: the task's own ``self.log("train/loss")`` and epoch-mean metric, Lightning's optimizer
loop and hooks, the resumable loader, deterministic algorithms (set for both sides).

    python bench/train_throughput.py                # CPU figures + bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from hpctrain.data.borehole import FEATURES, make_table
from hpctrain.data.sampling import EpochShuffleSampler, ResumableLoader
from hpctrain.data.tabular import TabularDataModule
from hpctrain.tasks.surrogate import SurrogateRegressor

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def _clocks() -> tuple[float, float]:
    # Wall clock, and this process's CPU time: on a shared machine other jobs' load stretches
    # the wall clock of whichever side happens to run at the wrong moment; CPU time does not see it.
    return time.perf_counter(), time.process_time()


def _rates(samples: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return samples / (end[0] - start[0]), samples / (end[1] - start[1])


class SteadyStateTimer(Callback):
    """Times training steps ``warmup .. end`` of a Lightning run."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = _clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps += 1
            self.end = _clocks()


def build_model(dm: TabularDataModule, args: argparse.Namespace) -> SurrogateRegressor:
    torch.manual_seed(0)
    model = SurrogateRegressor(hidden_sizes=args.hidden, lr=1e-3, lr_schedule="cosine")
    model.adopt_data_dims(dm.model_dims())
    return model


def lightning_run(dm: TabularDataModule, args: argparse.Namespace) -> tuple[float, float]:
    model = build_model(dm, args)
    timer = SteadyStateTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    return _rates(timer.steps * args.batch_size, timer.start, timer.end)


def plain_run(dm: TabularDataModule, args: argparse.Namespace) -> tuple[float, float]:
    model = build_model(dm, args)
    model.train()
    dataset = dm.dataset("train")
    loader = ResumableLoader(dataset, EpochShuffleSampler(dataset, seed=0), batch_size=args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total = args.steps

    def factor(step: int) -> float:  # the task's cosine schedule, stepped per batch
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = None
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            start = _clocks()
        if step == args.steps:
            break
        pred = model.net((x - model.x_mean) / model.x_std)
        loss = F.mse_loss(pred, (y - model.y_mean) / model.y_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return _rates((args.steps - args.warmup) * args.batch_size, start, _clocks())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512, 512])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rows = int(args.batch_size * args.steps / 0.9) + args.batch_size
    path = args.output.parent / "borehole-bench.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_table(rows, seed=0).to_parquet(path, index=False)
    dm = TabularDataModule(
        features=FEATURES,
        targets=["flow"],
        path=str(path),
        val_fraction=0.1,
        batch_size=args.batch_size,
        shuffle_seed=0,
    )
    dm.setup("fit")

    runs: dict[str, list[tuple[float, float]]] = {"lightning": [], "plain": []}
    plain_run(dm, args)  # untimed warm-up of allocator and kernels
    for _ in range(args.repeats):
        runs["lightning"].append(lightning_run(dm, args))
        runs["plain"].append(plain_run(dm, args))

    figures = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        lit = statistics.median(r[i] for r in runs["lightning"])
        plain = statistics.median(r[i] for r in runs["plain"])
        figures[clock] = {
            "lightning_samples_per_s": [round(r[i], 1) for r in runs["lightning"]],
            "plain_samples_per_s": [round(r[i], 1) for r in runs["plain"]],
            "median_lightning_samples_per_s": round(lit, 1),
            "median_plain_samples_per_s": round(plain, 1),
            "ratio": round(lit / plain, 4),
            # each Lightning repeat against the plain repeat right after it: cancels slow drift
            "median_pairwise_ratio": round(
                statistics.median(a[i] / b[i] for a, b in zip(runs["lightning"], runs["plain"], strict=True)),
                4,
            ),
            "lightning_overhead_ms_per_step": round(
                (args.batch_size / lit - args.batch_size / plain) * 1000, 3
            ),
            "plain_ms_per_step": round(args.batch_size / plain * 1000, 3),
        }
    result = {
        "benchmark": "train_throughput",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "threads": args.threads,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "model": {"task": "SurrogateRegressor", "hidden_sizes": args.hidden, "in_features": len(FEATURES)},
        "batch_size": args.batch_size,
        "steps_timed_per_repeat": args.steps - args.warmup,
        "repeats": args.repeats,
        "wall_clock": figures["wall"],
        "process_cpu_time": figures["cpu"],
        "target_ratio": 0.97,
        "gpu": "not measured",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for clock, label in (("wall", "wall clock"), ("cpu", "process CPU time")):
        f = figures[clock]
        print(
            f"[{label}] Lightning task {f['median_lightning_samples_per_s']:9.0f} samples/s | "
            f"plain PyTorch {f['median_plain_samples_per_s']:9.0f} samples/s | ratio {f['ratio']:.3f} "
            f"(pairwise {f['median_pairwise_ratio']:.3f}) "
            f"(target >= 0.97) | overhead {f['lightning_overhead_ms_per_step']:.2f} ms/step "
            f"of {f['plain_ms_per_step']:.1f} ms"
        )
    print(
        f"median of {args.repeats} interleaved repeats; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
