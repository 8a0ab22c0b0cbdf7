"""Hyperparameter sweeps as one Slurm job array: trial planning and the per-task command.

Pure functions. :func:`plan_trials` expands a grid or draws a seeded random sample;
:func:`array_command` turns the trials into one ``case "$SLURM_ARRAY_TASK_ID"`` block whose
branches are ordinary, fully quoted container commands, so each array task runs its own trial
in its own directory (``trial-<i>``) and nothing is evaluated from a data file at run time.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Any

from slurmflow.pipeline.jobs import Site, training_argv
from slurmflow.runtimes import container_command

#: hyperparameters a sweep may vary, and their types
SWEEPABLE = {"lr": float, "width": int, "batch_size": int, "max_epochs": int, "seed": int}
MAX_TRIALS = 256


def plan_trials(space: Mapping[str, Sequence[Any]], strategy: str = "grid", n_trials: int = 8,
                seed: int = 0) -> list[dict[str, Any]]:
    """The trials of a sweep: every combination (grid) or ``n_trials`` seeded random draws.

    :param space: hyperparameter -> candidate values, e.g. ``{"lr": [1e-3, 3e-3], "width": [32, 64]}``.
    :param strategy: ``grid`` or ``random``.
    :param n_trials: number of draws for ``random``.
    :param seed: seed of the random draws (same seed, same trials).
    :raises ValueError: an unknown hyperparameter, an empty list, or too many trials.
    """
    unknown = sorted(set(space) - set(SWEEPABLE))
    if unknown:
        raise ValueError(f"cannot sweep {unknown}; sweepable: {sorted(SWEEPABLE)}")
    if not space or any(not values for values in space.values()):
        raise ValueError("the search space needs at least one hyperparameter with at least one value")
    names = sorted(space)
    values = [[SWEEPABLE[n](v) for v in space[n]] for n in names]
    if strategy == "grid":
        combos = list(itertools.product(*values))
    elif strategy == "random":
        rng = random.Random(seed)
        combos = [tuple(rng.choice(v) for v in values) for _ in range(n_trials)]
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use grid or random")
    if len(combos) > MAX_TRIALS:
        raise ValueError(f"{len(combos)} trials is more than the {MAX_TRIALS} a sweep may submit")
    return [dict(zip(names, combo, strict=True)) for combo in combos]


def array_spec(n_trials: int, max_parallel: int) -> str:
    """``--array=0-(N-1)%K``: all trials in one submission, at most K running at once."""
    return f"0-{n_trials - 1}%{max(1, min(max_parallel, n_trials))}"


def array_command(params: Mapping[str, Any], trials: Sequence[Mapping[str, Any]], image: str, site: Site,
                  runtime: str, **container_kwargs: Any) -> str:
    """One shell block: the branch for ``$SLURM_ARRAY_TASK_ID`` runs that trial's training."""
    lines = ['case "${SLURM_ARRAY_TASK_ID:?not an array task}" in']
    for i, trial in enumerate(trials):
        fragment = container_command(runtime, image, training_argv({**params, **trial}), workdir="$HPCTRAIN_JOB_DIR",
                                     **container_kwargs)
        lines += [
            f"{i})",
            f'  export HPCTRAIN_JOB_DIR="$SLURMFLOW_JOB_DIR/trial-{i}"',
            '  mkdir -p "$HPCTRAIN_JOB_DIR"',
            fragment.rstrip("\n"),  # not indented: the fragment may hold a here-document
            "  ;;",
        ]
    lines += ['*) echo "no trial for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def best_trial(results: Sequence[Mapping[str, Any]], metric: str, mode: str = "min") -> Mapping[str, Any]:
    """The trial with the best ``metric`` (``results`` items carry ``metrics``)."""
    scored = [r for r in results if isinstance((r.get("metrics") or {}).get(metric), int | float)]
    if not scored:
        raise ValueError(f"no trial reported {metric}")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r["metrics"][metric])


def plot_trials(results: Sequence[Mapping[str, Any]], metric: str, path: str) -> str:
    """Scatter ``metric`` against each swept hyperparameter (one panel each); write a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    scored = [r for r in results if isinstance((r.get("metrics") or {}).get(metric), int | float)]
    names = sorted({k for r in scored for k in r["params"]})
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        ax.scatter([r["params"][name] for r in scored], [r["metrics"][metric] for r in scored])
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        if name == "lr":
            ax.set_xscale("log")
    fig.suptitle(f"{metric} per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
