"""Configs that can never run fail fast, with a readable message, before any training step."""

from __future__ import annotations

import pytest
from hpctrain_testing import SURROGATE_TINY

FEATURES = "--data.features=[rw, r, Tu, Hu, Tl, Hl, L, Kw]"


def _assert_nothing_trained(job):
    assert not (job / "checkpoints").exists() or not any((job / "checkpoints").iterdir())
    assert not (job / "model").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.bogus=1"], "bogus"),  # unknown key
        (["--data.batch_size=many"], "batch_size"),  # wrong type
        (["--trainer.max_epochs=2.5"], "max_epochs"),  # wrong type
        (["--run.tracking=sometimes"], "tracking"),  # not one of the choices
    ],
)
def test_parser_rejects_unknown_keys_and_wrong_types(hpctrain, borehole_csv, tmp_path, capsys, args, message):
    job = tmp_path / "job"
    rc = hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", f"--run.job_dir={job}", *args)
    assert rc == 2
    assert message in capsys.readouterr().err
    _assert_nothing_trained(job)


def test_unknown_key_in_config_file(hpctrain, borehole_csv, tmp_path, capsys):
    cfg = tmp_path / "extra.yaml"
    cfg.write_text("model:\n  init_args:\n    hidden_size: 64\n")  # typo of hidden_sizes
    rc = hpctrain(
        "fit", *SURROGATE_TINY, "--config", cfg, f"--data.path={borehole_csv}", f"--run.job_dir={tmp_path}"
    )
    assert rc == 2 and "hidden_size" in capsys.readouterr().err


def test_missing_data_file(hpctrain, tmp_path, capsys):
    job = tmp_path / "job"
    rc = hpctrain("fit", *SURROGATE_TINY, f"--data.path={tmp_path / 'nope.parquet'}", f"--run.job_dir={job}")
    assert rc == 2
    assert "file not found" in capsys.readouterr().err
    _assert_nothing_trained(job)


def test_missing_columns(hpctrain, borehole_csv, tmp_path, capsys):
    rc = hpctrain(
        "fit",
        *SURROGATE_TINY,
        f"--data.path={borehole_csv}",
        "--data.targets=[pressure]",
        f"--run.job_dir={tmp_path}",
    )
    assert rc == 2 and "['pressure'] not in" in capsys.readouterr().err


def test_two_sources_or_none(hpctrain, borehole_csv, tmp_path, capsys):
    rc = hpctrain(
        "fit",
        *SURROGATE_TINY,
        f"--data.path={borehole_csv}",
        "--data.mongo.database=x",
        "--data.mongo.collection=y",
        f"--run.job_dir={tmp_path}",
    )
    assert rc == 2 and "exactly one of" in capsys.readouterr().err


def test_shape_contradicting_data(hpctrain, borehole_csv, tmp_path, capsys):
    rc = hpctrain(
        "fit",
        *SURROGATE_TINY,
        f"--data.path={borehole_csv}",
        "--model.in_features=3",
        f"--run.job_dir={tmp_path / 'job'}",
    )
    assert rc == 2 and "in_features=3 but the data provides 8" in capsys.readouterr().err
    _assert_nothing_trained(tmp_path / "job")


def test_mongo_without_uri(hpctrain, tmp_path, capsys):
    rc = hpctrain(
        "fit",
        *SURROGATE_TINY,
        "--data.path=null",
        "--data.mongo.database=x",
        "--data.mongo.collection=y",
        f"--run.job_dir={tmp_path}",
    )
    assert rc == 2 and "MONGO_URI" in capsys.readouterr().err
