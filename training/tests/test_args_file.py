"""``hpctrain fit --args-file``: a sweep trial's own arguments, read as JSON data."""

from __future__ import annotations

import json

import pytest
from hpctrain_testing import SURROGATE_TINY

from hpctrain.cli import expand_args_files
from hpctrain.manifest import load_manifest


def test_args_file_is_spliced_where_it_stands(tmp_path):
    f = tmp_path / "trial-args.json"
    f.write_text(json.dumps(["--model.lr=0.5", "--model.hidden_sizes=[8, 8]"]))
    assert expand_args_files(["--a=1", "--args-file", str(f), "--b=2"]) == [
        "--a=1", "--model.lr=0.5", "--model.hidden_sizes=[8, 8]", "--b=2"]
    assert expand_args_files([f"--args-file={f}"]) == ["--model.lr=0.5", "--model.hidden_sizes=[8, 8]"]


@pytest.mark.parametrize("content, error", [
    (None, "cannot read"),
    ("not json", "cannot read"),
    ('{"lr": 1}', "JSON list of strings"),
    ("[1, 2]", "JSON list of strings"),
])
def test_a_bad_args_file_is_a_config_error(tmp_path, hpctrain, content, error, capsys):
    f = tmp_path / "trial-args.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ValueError, match=error):
        expand_args_files(["--args-file", str(f)])
    assert hpctrain("fit", "--args-file", str(f)) == 2
    assert error in capsys.readouterr().err


def test_fit_takes_the_trials_values_over_the_base(hpctrain, borehole_csv, tmp_path):
    f = tmp_path / "trial-args.json"
    f.write_text(json.dumps(["--model.lr=0.02", "--trainer.max_epochs=1"]))
    job = tmp_path / "job"
    rc = hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", "--model.lr=0.01",
                  f"--run.job_dir={job}", "--args-file", str(f))
    assert rc == 0
    hp = load_manifest(job)["hyperparameters"]
    assert hp["model"]["lr"] == 0.02 and hp["trainer"]["max_epochs"] == 1
