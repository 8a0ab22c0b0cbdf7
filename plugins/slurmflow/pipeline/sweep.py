"""Hyperparameter sweeps as Slurm job arrays: trial planning, pieces and the per-task command.

Pure functions. :func:`plan_trials` expands a grid or draws a seeded random sample;
:func:`plan_pieces` splits the trials into array jobs no larger than the cluster's
``MaxArraySize``; :func:`piece_command` renders one piece's command: the *same* container
command for every array task, plus a table of each trial's own arguments (one JSON list per
line, in a quoted here-document) from which the batch shell copies its line into the trial's
directory. Nothing from the table is evaluated by the shell: ``hpctrain fit --args-file`` reads
it as JSON, so a script stays small (tens of bytes per trial) however many trials a piece holds.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slurmflow.pipeline.experiments import stage_config_lines
from slurmflow.pipeline.jobs import training_argv
from slurmflow.runtimes import container_command

#: hyperparameters a sweep may vary, and their types
SWEEPABLE = {"lr": float, "width": int, "batch_size": int, "max_epochs": int, "seed": int}
MAX_TRIALS = 10_000
#: Slurm's default ``MaxArraySize``: array indices run from 0 to this minus one
DEFAULT_MAX_ARRAY_SIZE = 1001
#: the file, in each trial's directory, holding that trial's own arguments
TRIAL_ARGS_FILE = "trial-args.json"
_TABLE_END = "SLURMFLOW_TRIALS"  # a table line is a JSON list: it starts with "[", never with this


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
        size = 1
        for v in values:
            size *= len(v)
        if size > MAX_TRIALS:  # before expanding: a large grid is refused without building it
            raise ValueError(f"{size} trials is more than the {MAX_TRIALS} a sweep may submit")
        combos = list(itertools.product(*values))
    elif strategy == "random":
        if n_trials > MAX_TRIALS:
            raise ValueError(f"{n_trials} trials is more than the {MAX_TRIALS} a sweep may submit")
        rng = random.Random(seed)
        combos = [tuple(rng.choice(v) for v in values) for _ in range(n_trials)]
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use grid or random")
    return [dict(zip(names, combo, strict=True)) for combo in combos]


@dataclass(frozen=True)
class Piece:
    """One array job of a sweep: trials ``offset`` .. ``offset + count - 1``.

    :param index: the piece's position (its map index in the DAG).
    :param offset: the sweep-wide number of its first trial.
    :param count: how many trials (array tasks) it holds.
    """

    index: int
    offset: int
    count: int

    def array(self, max_parallel: int) -> str:
        """``--array=0-(count-1)%K``: at most ``max_parallel`` of its trials run at once."""
        return f"0-{self.count - 1}%{max(1, min(int(max_parallel), self.count))}"

    def trial_of(self, array_task: int) -> int:
        return self.offset + int(array_task)


def plan_pieces(n_trials: int, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE) -> list[Piece]:
    """Split ``n_trials`` into array jobs Slurm accepts (indices below ``max_array_size``).

    The DAG runs the pieces one after another (``max_active_tis_per_dagrun=1`` on its train
    task), each throttled to ``%K``: so at most K trials run at once across the whole sweep,
    and a piece is exactly-once like any job (its map index is part of its key).

    :param n_trials: trials in the sweep (at least 1).
    :param max_array_size: the cluster's ``MaxArraySize`` (``scontrol show config``), or a
        smaller cap of the site's.
    """
    if n_trials < 1:
        raise ValueError("a sweep needs at least one trial")
    if max_array_size < 1:
        raise ValueError(f"MaxArraySize must be positive, got {max_array_size}")
    return [Piece(i, offset, min(max_array_size, n_trials - offset))
            for i, offset in enumerate(range(0, n_trials, max_array_size))]


def trial_args(params: Mapping[str, Any], trial: Mapping[str, Any]) -> list[str]:
    """The arguments a trial changes against the sweep's base command (later flags win in
    LightningCLI, so these are appended after the base arguments)."""
    base = training_argv(params)
    return [arg for arg in training_argv({**params, **trial}) if arg not in base]


def piece_command(params: Mapping[str, Any], trials: Sequence[Mapping[str, Any]], piece: Piece, image: str,
                  runtime: str, *, config_text: str, **container_kwargs: Any) -> str:
    """The command of one piece: its array task runs trial ``piece.offset + SLURM_ARRAY_TASK_ID``
    in ``$SLURMFLOW_JOB_DIR/trial-<trial>``, with that trial's arguments and its own copy of the
    experiment config (``config_text``, see :mod:`slurmflow.pipeline.experiments`).

    :param params: the run's Params (the base arguments every trial shares).
    :param trials: all trials of the sweep (:func:`plan_trials`).
    :param piece: which of them this array job runs.
    :param image: the pinned image; ``runtime`` and ``container_kwargs`` as in
        :func:`~slurmflow.runtimes.container_command`.
    """
    argv = [*training_argv(params), "--args-file", TRIAL_ARGS_FILE]
    table = [json.dumps(trial_args(params, trials[piece.trial_of(t)])) for t in range(piece.count)]
    run = container_command(runtime, image, argv, workdir="$HPCTRAIN_JOB_DIR", **container_kwargs)
    return "\n".join([
        f"# slurmflow: trials {piece.offset}-{piece.offset + piece.count - 1} of the sweep, one per array task",
        f'sf_trial=$(( ${{SLURM_ARRAY_TASK_ID:?not an array task}} + {piece.offset} ))',
        'export HPCTRAIN_JOB_DIR="$SLURMFLOW_JOB_DIR/trial-$sf_trial"',
        'mkdir -p "$HPCTRAIN_JOB_DIR" || exit 1',
        "# each trial's own arguments, one JSON list per array task: copied, never evaluated",
        f'sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" > "$HPCTRAIN_JOB_DIR/{TRIAL_ARGS_FILE}" <<\'{_TABLE_END}\'',
        *table,
        _TABLE_END,
        f'if [ ! -s "$HPCTRAIN_JOB_DIR/{TRIAL_ARGS_FILE}" ]; then',
        '  echo "no trial for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2',
        "fi",
        *stage_config_lines(config_text, "$HPCTRAIN_JOB_DIR"),
        run.rstrip("\n"),
    ]) + "\n"


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
