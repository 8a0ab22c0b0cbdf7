"""Sweep planning: trials, pieces over MaxArraySize, and the per-piece command run by a real shell."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from slurmflow.pipeline.jobs import training_argv
from slurmflow.pipeline.sweep import (
    MAX_TRIALS,
    TRIAL_ARGS_FILE,
    Piece,
    piece_command,
    plan_pieces,
    plan_trials,
    trial_args,
)

CONFIG = "seed_everything: 1\nmodel: {note: \"$(touch pwned) `id`\"}\n"
PARAMS = {"task": "deepcam", "seed": 1, "max_epochs": 2, "lr": 0.001, "batch_size": 4, "width": 8, "data_seed": 0}


def test_grid_and_seeded_random_trials():
    assert plan_trials({"lr": [0.1, 0.2], "width": [4]}) == [{"lr": 0.1, "width": 4}, {"lr": 0.2, "width": 4}]
    a = plan_trials({"lr": [0.1, 0.2, 0.3]}, "random", n_trials=5, seed=7)
    assert a == plan_trials({"lr": [0.1, 0.2, 0.3]}, "random", n_trials=5, seed=7) and len(a) == 5


def test_ten_thousand_trials_are_allowed_and_more_are_refused_before_expanding():
    assert len(plan_trials({"lr": [0.01] * 100, "seed": list(range(100))})) == MAX_TRIALS
    with pytest.raises(ValueError, match="10001 trials"):
        plan_trials({"lr": [0.01], "seed": list(range(10_001))})
    with pytest.raises(ValueError, match="1000000 trials"):  # refused without building a million dicts
        plan_trials({"lr": [0.1] * 1000, "seed": list(range(1000))})
    with pytest.raises(ValueError, match="more than"):
        plan_trials({"lr": [0.1]}, "random", n_trials=MAX_TRIALS + 1)


@pytest.mark.parametrize("n, size, expected", [
    (5, 1001, [(0, 0, 5)]),
    (1001, 1001, [(0, 0, 1001)]),
    (1002, 1001, [(0, 0, 1001), (1, 1001, 1)]),
    (10_000, 1001, [(i, i * 1001, 1001) for i in range(9)] + [(9, 9009, 991)]),
    (5, 3, [(0, 0, 3), (1, 3, 2)]),
])
def test_pieces_cover_every_trial_once_below_max_array_size(n, size, expected):
    pieces = plan_pieces(n, size)
    assert [(p.index, p.offset, p.count) for p in pieces] == expected
    assert all(p.count <= size for p in pieces)
    assert [p.trial_of(t) for p in pieces for t in range(p.count)] == list(range(n))


def test_a_piece_throttles_to_max_parallel_but_never_above_its_size():
    assert Piece(0, 0, 1001).array(4) == "0-1000%4"
    assert Piece(1, 1001, 2).array(4) == "0-1%2"
    with pytest.raises(ValueError):
        plan_pieces(0)


def test_a_trial_carries_only_what_it_changes():
    assert trial_args(PARAMS, {"lr": 0.01, "width": 8}) == ["--model.lr=0.01"]
    assert trial_args(PARAMS, {"lr": 0.001}) == []
    surrogate = {**PARAMS, "task": "surrogate", "data_collection": "borehole", "data_query": {"day": {"$lte": "x"}}}
    assert trial_args(surrogate, {"width": 16}) == ["--model.hidden_sizes=[16, 16, 8]"]


def test_the_script_grows_by_tens_of_bytes_per_trial():
    trials = plan_trials({"lr": [0.001 * (i + 1) for i in range(1000)]})
    command = piece_command(PARAMS, trials, plan_pieces(1000)[0], "reg/img@sha256:" + "a" * 64, "docker",
                            config_text=CONFIG)
    assert len(command) < 30 * 1000 + 5000, len(command)


def _run_piece(tmp_path: Path, trials, piece: Piece, task: int) -> subprocess.CompletedProcess:
    """The piece's command in bash with runtime none and a fake python that shows what it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/bash\necho "cwd=$PWD"\necho "argv=$*"\necho "args=$(cat trial-args.json)"\n')
    fake.chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURMFLOW_JOB_DIR": str(job_dir),
           "SLURM_ARRAY_TASK_ID": str(task), "HOME": str(tmp_path)}
    script = piece_command(PARAMS, trials, piece, None, "none", config_text=CONFIG)
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_each_array_task_runs_its_own_trial_in_its_own_directory(tmp_path):
    trials = plan_trials({"lr": [0.1, 0.2, 0.3, 0.4, 0.5]})
    second = plan_pieces(5, 3)[1]  # trials 3 and 4
    out = _run_piece(tmp_path, trials, second, 1)
    assert out.returncode == 0, out.stderr
    trial_dir = tmp_path / "job" / "trial-4"
    assert f"cwd={trial_dir}" in out.stdout
    assert json.loads((trial_dir / TRIAL_ARGS_FILE).read_text()) == ["--model.lr=0.5"]
    # the base arguments, then the trial's file: LightningCLI lets the later value win
    assert f"argv={' '.join(training_argv(PARAMS)[1:])} --args-file {TRIAL_ARGS_FILE}" in out.stdout
    assert not (tmp_path / "job" / "trial-3").exists()
    # the experiment config travels with the job: each trial its own copy, byte for byte
    assert (trial_dir / "experiment.yaml").read_text() == CONFIG


def test_an_array_task_beyond_the_table_fails_clearly(tmp_path):
    trials = plan_trials({"lr": [0.1, 0.2]})
    out = _run_piece(tmp_path, trials, plan_pieces(2)[0], 5)
    assert out.returncode == 2 and "no trial for array task 5" in out.stderr


def test_the_table_is_data_for_the_shell(tmp_path):
    """A value with shell syntax in it stays a value: the table is a quoted here-document."""
    params = {**PARAMS, "task": "surrogate", "data_collection": "c", "data_query": {"note": "$(touch pwned) `id`"}}
    trials = plan_trials({"width": [4, 16]})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/bash\ncat trial-args.json\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "job").mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURMFLOW_JOB_DIR": str(tmp_path / "job"),
           "SLURM_ARRAY_TASK_ID": "1", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", piece_command(params, trials, plan_pieces(2)[0], None, "none", config_text=CONFIG)],
                         env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["--model.hidden_sizes=[16, 16, 8]"]
    assert not list(tmp_path.rglob("pwned"))
    assert (tmp_path / "job" / "trial-1" / "experiment.yaml").read_text() == CONFIG  # the config too


def test_trials_are_laid_out_over_the_pieces_in_map_order():
    from slurmflow.pipeline.sweep_results import layout

    trials = [{"lr": i} for i in range(5)]
    pieces = [{"job_id": "7", "job_dir": "/j/train.m0/g0", "array": {"total": 3}},
              {"job_id": "9", "job_dir": "/j/train.m1/g0", "array": {"total": 2}}]
    out = layout(pieces, trials)
    assert [(t.index, t.piece, t.array_task, t.slurm_job_id) for t in out] == [
        (0, 0, 0, "7_0"), (1, 0, 1, "7_1"), (2, 0, 2, "7_2"), (3, 1, 0, "9_0"), (4, 1, 1, "9_1")]
    assert out[4].job_dir == "/j/train.m1/g0/trial-4"
    with pytest.raises(ValueError, match="ran 3 trials, but 5 were planned"):
        layout(pieces[:1], trials)


def test_a_trial_summary_says_why_it_failed():
    from slurmflow.pipeline.sweep_results import Trial, failed_fraction

    ok = Trial(0, {"lr": 1}, 0, {"job_id": "7", "job_dir": "/j"}, 0, manifest={"status": "completed"}, run_id="r")
    bad = Trial(1, {"lr": 2}, 0, {"job_id": "7", "job_dir": "/j"}, 1, manifest={"status": "failed"},
                state="FAILED", reason="NonZeroExitCode, exit code 1", log_tail="boom")
    assert ok.summary()["status"] == "completed" and ok.summary()["run_id"] == "r"
    assert bad.summary() == {"trial": 1, "params": {"lr": 2}, "piece": 0, "slurm_job_id": "7_1", "status": "failed",
                             "state": "FAILED", "reason": "NonZeroExitCode, exit code 1", "log_tail": "boom",
                             "run_id": None}
    assert failed_fraction([ok, bad]) == 0.5 and failed_fraction([]) == 0.0
