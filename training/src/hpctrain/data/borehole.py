"""The borehole function: a classic surrogate-modelling benchmark, as a table to train on.

Water flow (m^3/yr) through a borehole between two aquifers as a function of eight physical
inputs (Harper & Gupta 1983; used throughout the surrogate/UQ literature). Cheap to evaluate,
non-linear, with inputs spanning orders of magnitude: a stand-in for a simulation campaign whose
results land in a file or a MongoDB collection.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

#: input name -> (low, high) of its sampling range
RANGES: dict[str, tuple[float, float]] = {
    "rw": (0.05, 0.15),  # borehole radius (m)
    "r": (100.0, 50_000.0),  # radius of influence (m)
    "Tu": (63_070.0, 115_600.0),  # transmissivity, upper aquifer (m^2/yr)
    "Hu": (990.0, 1_110.0),  # potentiometric head, upper aquifer (m)
    "Tl": (63.1, 116.0),  # transmissivity, lower aquifer (m^2/yr)
    "Hl": (700.0, 820.0),  # potentiometric head, lower aquifer (m)
    "L": (1_120.0, 1_680.0),  # borehole length (m)
    "Kw": (9_855.0, 12_045.0),  # hydraulic conductivity of the borehole (m/yr)
}
FEATURES = list(RANGES)
TARGET = "flow"


def borehole(x: dict[str, np.ndarray]) -> np.ndarray:
    """Water flow for inputs given as arrays keyed by :data:`FEATURES`."""
    log_ratio = np.log(x["r"] / x["rw"])
    denominator = log_ratio * (
        1.0 + 2.0 * x["L"] * x["Tu"] / (log_ratio * x["rw"] ** 2 * x["Kw"]) + x["Tu"] / x["Tl"]
    )
    return 2.0 * math.pi * x["Tu"] * (x["Hu"] - x["Hl"]) / denominator


def make_table(rows: int, seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    """Uniformly sampled inputs and their flow (optionally with relative Gaussian noise).

    :param rows: number of rows.
    :param seed: sampling seed.
    :param noise: relative noise standard deviation added to the flow.
    """
    rng = np.random.default_rng(seed)
    x = {name: rng.uniform(lo, hi, rows) for name, (lo, hi) in RANGES.items()}
    y = borehole(x)
    if noise:
        y = y * (1.0 + noise * rng.standard_normal(rows))
    return pd.DataFrame({**x, TARGET: y})


def main(argv: list[str] | None = None) -> int:
    """``hpctrain make-data``: write a borehole table (``.parquet`` or ``.csv`` by suffix)."""
    parser = argparse.ArgumentParser(prog="hpctrain make-data", description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="file to write (.parquet or .csv)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0)
    args = parser.parse_args(argv)
    table = make_table(args.rows, args.seed, args.noise)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".csv":
        table.to_csv(args.output, index=False)
    else:
        table.to_parquet(args.output, index=False)
    print(f"wrote {len(table)} rows to {args.output}")
    return 0


#: the held-out table is drawn with this offset on the seed: never the training rows
HOLDOUT_SEED_OFFSET = 1_000_003


def prepare_main(argv: list[str] | None = None) -> int:
    """``hpctrain prepare OUT_DIR``: a data set as a pipeline stage writes it.

    ``train.parquet`` (``--rows``) and ``holdout.parquet`` (``--holdout-rows``, drawn with another
    seed) plus ``dataset.json`` (what made them). Same arguments, same bytes: the stage's outputs
    hash by content (slurmflow's ``experiment_pipeline``, README "Staged pipelines").
    """
    import json

    parser = argparse.ArgumentParser(prog="hpctrain prepare", description=prepare_main.__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="directory to write into")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--holdout-rows", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.holdout_rows < 1:
        parser.error("--rows and --holdout-rows must be positive")
    args.output.mkdir(parents=True, exist_ok=True)
    make_table(args.rows, args.seed, args.noise).to_parquet(args.output / "train.parquet", index=False)
    holdout = make_table(args.holdout_rows, args.seed + HOLDOUT_SEED_OFFSET, args.noise)
    holdout.to_parquet(args.output / "holdout.parquet", index=False)
    (args.output / "dataset.json").write_text(json.dumps({
        "generator": "borehole", "rows": args.rows, "holdout_rows": args.holdout_rows, "seed": args.seed,
        "noise": args.noise, "features": FEATURES, "targets": [TARGET]}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.rows} training and {args.holdout_rows} held-out rows to {args.output}")
    return 0
