"""Your own model: the ``config`` Param lists training/configs, ``overrides`` are patterned at
trigger time and parsed by hpctrain's own parser at preflight, and the config travels with the job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from slurmflow.pipeline.experiments import (
    STAGED_CONFIG,
    config_path,
    experiment_configs,
    read_config,
    stage_config_lines,
)
from slurmflow.pipeline.jobs import Site, training_argv, training_job
from slurmflow.pipeline.params import train_params
from slurmflow.pipeline.preparation import check_experiment, model_name_of

REPO = Path(__file__).resolve().parents[2]
SITE = Site(partition="debug", account="", runtime="none")


def params(**conf):
    """train_model's Params as Airflow resolves them: the schema-checked conf over the defaults."""
    schema = train_params()
    merged = {name: p.value for name, p in schema.items()}
    for name, value in conf.items():
        jsonschema.validate(value, schema[name].schema)
    merged.update(conf)
    return merged


# -- discovery ---------------------------------------------------------------------------------
def test_the_config_param_lists_every_config_in_training_configs():
    on_disk = sorted(p.stem for p in (REPO / "training" / "configs").glob("*.yaml"))
    assert {"surrogate", "surrogate_mongo", "deepcam", "ecg"} <= set(on_disk)
    assert experiment_configs() == on_disk
    assert train_params()["config"].schema["enum"] == [None, *on_disk]  # null: the task's reference config


def test_a_new_config_file_is_picked_up_without_code(tmp_path):
    (tmp_path / "training" / "configs").mkdir(parents=True)
    (tmp_path / "training" / "configs" / "mine.yaml").write_text("seed_everything: 3\n")
    (tmp_path / "training" / "configs" / "notes.txt").write_text("not a config")
    assert experiment_configs(tmp_path) == ["mine"]
    assert read_config("mine", tmp_path) == "seed_everything: 3\n"
    with pytest.raises(ValueError, match="unknown config 'nope'.*mine"):
        config_path("nope", tmp_path)


def test_the_dag_offers_the_example_config():
    """The DAG file itself, parsed as the dag-processor parses it, offers ecg in its form."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "train_model.py"))
    assert not bag.import_errors
    schema = bag.dags["train_model"].params.get_param("config").schema
    assert "ecg" in schema["enum"]


@pytest.mark.parametrize("value", ["ecg", None])
def test_config_accepts_known_configs(value):
    jsonschema.validate(value, train_params()["config"].schema)


def test_config_refuses_unknown_names_at_trigger_time():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("../../etc/passwd", train_params()["config"].schema)


# -- overrides: the pattern at trigger time ------------------------------------------------------
@pytest.mark.parametrize("item", ["--model.lr=0.001", "--data.batch_size=32", "--trainer.gradient_clip_val=1.0",
                                  "--seed_everything=7", "--model.hidden_sizes=[64, 64]", "--run.target=0.9",
                                  '--data.mongo={"database": "x", "query": {"a": 1}}', "--model.init_args.lr=1e-4"])
def test_override_pattern_accepts_lightning_cli_keys(item):
    jsonschema.validate([item], train_params()["overrides"].schema)


@pytest.mark.parametrize("item", ["--model.lr", "model.lr=1", "--model.lr 0.1", "--optimizer.lr=1", "--x=1",
                                  "--model..lr=1", "--model.lr=1\nrm -rf /", "-m", "--config=/etc/passwd",
                                  "--trainer=1", "--model.1lr=2"])
def test_override_pattern_refuses_other_shapes(item):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([item], train_params()["overrides"].schema)


@pytest.mark.parametrize("item", ["--run.job_dir=/tmp", "--run.init_from=x.ckpt", "--run.init_mode=weights"])
def test_overrides_of_what_a_param_owns_are_refused(item):
    jsonschema.validate([item], train_params()["overrides"].schema)  # the form admits the shape...
    with pytest.raises(ValueError, match="set by slurmflow"):
        training_argv(params(overrides=[item]))  # ...check_training_params (preflight) does not


# -- the job's arguments ---------------------------------------------------------------------------
def test_a_config_run_takes_only_seed_epochs_and_the_overrides():
    argv = training_argv(params(config="ecg", max_epochs=4, seed=3, overrides=["--model.width=8"]))
    assert argv == ["python", "-P", "-m", "hpctrain", "fit", "--config", STAGED_CONFIG, "--seed_everything=3",
                    "--trainer.max_epochs=4", "--model.width=8"]


def test_overrides_come_last_on_a_reference_task_too():
    argv = training_argv(params(task="deepcam", overrides=["--model.lr=0.5"]))
    assert argv[argv.index("--config") + 1] == STAGED_CONFIG
    assert argv[-1] == "--model.lr=0.5" and "--model.lr=0.003" in argv  # the later one wins in LightningCLI


def test_model_name_defaults_to_the_config():
    assert model_name_of(params(config="ecg")) == "slurmflow-ecg"
    assert model_name_of(params()) == "slurmflow-surrogate"
    assert model_name_of(params(config="ecg", model_name="mine")) == "mine"


# -- preflight: hpctrain's parser in the worker -------------------------------------------------
def test_preflight_parses_config_and_overrides_with_hpctrains_parser():
    assert check_experiment(params(config="ecg", overrides=["--model.width=8", "--data.noise=0.1"])) == \
        "hpctrain.tasks.ecg.ECGClassifier"
    assert check_experiment(params()) is None  # nothing of the user's to parse


@pytest.mark.parametrize("overrides, message", [
    (["--model.widht=8"], "widht"),          # a key the model does not have
    (["--model.width=eight"], "width"),      # a wrong type
    (["--trainer.epochs=3"], "epochs"),
])
def test_preflight_refuses_a_bad_override_with_the_parsers_message(overrides, message):
    with pytest.raises(AirflowFailException) as info:
        check_experiment(params(config="ecg", overrides=overrides))
    text = str(info.value)
    assert "refused by hpctrain's parser" in text and message in text


def test_preflight_refuses_a_bad_override_of_a_reference_task_too():
    with pytest.raises(AirflowFailException, match="hidden_size"):
        check_experiment(params(task="surrogate", overrides=["--model.hidden_size=3"]))


# -- the config travels with the job ---------------------------------------------------------------
def _run_command(command: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The job's command in bash with runtime none and a fake python that shows its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text('#!/bin/bash\necho "cwd=$PWD"\necho "argv=$*"\n')
    (bin_dir / "python").chmod(0o755)
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURMFLOW_JOB_DIR": str(job), "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", f'cd "$SLURMFLOW_JOB_DIR"\n{command}'], env=env, capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    return out, job


def test_the_job_writes_its_config_and_trains_it_by_path(tmp_path):
    text = read_config("ecg")
    job = training_job(params(config="ecg"), None, SITE, text)
    out, job_dir = _run_command(job["command"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (job_dir / STAGED_CONFIG).read_text() == text
    assert f"--config {STAGED_CONFIG} " in out.stdout


def test_the_staged_config_is_data_for_the_shell(tmp_path):
    text = 'model: {note: "$(touch pwned) `id` ${HOME}"}\n'
    out, job_dir = _run_command("\n".join(stage_config_lines(text)), tmp_path)
    assert out.returncode == 0, out.stderr
    assert (job_dir / STAGED_CONFIG).read_text() == text and not list(tmp_path.rglob("pwned"))


def test_a_config_that_would_end_the_here_document_is_refused(tmp_path):
    (tmp_path / "training" / "configs").mkdir(parents=True)
    (tmp_path / "training" / "configs" / "bad.yaml").write_text("a: 1\nSLURMFLOW_CONFIG_END\n")
    with pytest.raises(ValueError, match="ends the staged copy"):
        read_config("bad", tmp_path)
