"""Continue a previous experiment: ``init_from`` patterns, reference resolution against a real
MLflow (sqlite store, no server), the checks preflight makes, and where the checkpoint comes from."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

from slurmflow.pipeline.jobs import INIT_CHECKPOINT, Site, training_argv, training_job
from slurmflow.pipeline.lineage import (
    CHECKPOINT_ARTIFACT,
    INIT_FROM_TAG,
    INIT_MODE_TAG,
    PARENT_TAG,
    LineageError,
    Parent,
    check_continuation,
    checkpoint_source,
    parse_reference,
    resolve,
    staged_checkpoint_path,
)
from slurmflow.pipeline.params import train_params
from slurmflow.pipeline.preparation import lineage_tags

RUN_ID = "0123456789abcdef0123456789abcdef"


def params(**conf):
    schema = train_params()
    merged = {name: p.value for name, p in schema.items()}
    for name, value in conf.items():
        jsonschema.validate(value, schema[name].schema)
    merged.update(conf)
    return merged


# -- the Params' patterns (trigger time) ----------------------------------------------------------
@pytest.mark.parametrize("value", [None, "models:/slurmflow-surrogate/3", "models:/slurmflow-ecg@champion",
                                   "models:/my.model_v2/12", RUN_ID])
def test_init_from_accepts_versions_aliases_and_run_ids(value):
    jsonschema.validate(value, train_params()["init_from"].schema)


@pytest.mark.parametrize("value", ["models:/m", "models:/m/0", "models:/m/latest", "models:/m@", "models:/m/1/x",
                                   "runs:/abc/model", RUN_ID[:-1], RUN_ID.upper(), "models:/m;rm -rf/1",
                                   "models:/m@al ias", "/path/last.ckpt", ""])
def test_init_from_refuses_anything_else(value):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, train_params()["init_from"].schema)


@pytest.mark.parametrize("value, ok", [("resume", True), ("weights", True), ("finetune", False), (None, False)])
def test_init_mode_is_an_enum(value, ok):
    schema = train_params()["init_mode"].schema
    if ok:
        jsonschema.validate(value, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
    assert train_params()["init_mode"].value == "resume"


def test_parse_reference():
    assert parse_reference("models:/m/3") == {"kind": "version", "name": "m", "version": "3"}
    assert parse_reference("models:/m@champion") == {"kind": "alias", "name": "m", "alias": "champion"}
    assert parse_reference(RUN_ID) == {"kind": "run", "run_id": RUN_ID}
    with pytest.raises(LineageError, match="is not models:/"):
        parse_reference("runs:/x")


# -- resolution against a real MLflow --------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow for the module (creating its schema takes seconds): two parent runs as
    slurmflow's register step leaves them, the first registered as version 1 (alias champion)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.create_experiment("surrogate", artifact_location=(tmp / "artifacts").as_uri())
    client.create_registered_model("slurmflow-surrogate")
    plain, with_checkpoint = (a_parent_run(client, exp, tmp / name, with_checkpoint=ckpt)
                              for name, ckpt in (("a", False), ("b", True)))
    client.create_model_version("slurmflow-surrogate", f"runs:/{plain}/model", run_id=plain)
    client.set_registered_model_alias("slurmflow-surrogate", "champion", "1")
    return client, plain, with_checkpoint


def a_parent_run(client, exp: str, tmp_path: Path, *, epochs: int = 2, with_checkpoint: bool = False) -> str:
    """Slurm tags, result.json under result/ (and maybe the checkpoint artifact), as register logs them."""
    tmp_path.mkdir(parents=True)
    run = client.create_run(exp, tags={"slurm.job_dir": "/scratch/jobs/train_model/r1/train/g0",
                                       "slurm.cluster": "slurm_default",
                                       "hpctrain.task": "hpctrain.tasks.surrogate.SurrogateRegressor"})
    rid = run.info.run_id
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"status": "completed", "task": "hpctrain.tasks.surrogate.SurrogateRegressor",
                                  "training": {"epochs_completed": epochs, "global_step": 7 * epochs}}))
    client.log_artifact(rid, str(result), "result")
    if with_checkpoint:
        ckpt = tmp_path / "last.ckpt"
        ckpt.write_bytes(b"checkpoint")
        client.log_artifact(rid, str(ckpt), "checkpoints")
    client.set_terminated(rid)
    return rid


def test_a_version_an_alias_and_a_run_id_resolve_to_the_same_run(store):
    client, rid, _ = store
    by_version = resolve(client, "models:/slurmflow-surrogate/1")
    by_alias = resolve(client, "models:/slurmflow-surrogate@champion")
    by_run = resolve(client, rid)
    assert by_version.run_id == by_alias.run_id == by_run.run_id == rid
    assert (by_version.model_name, by_version.model_version) == ("slurmflow-surrogate", "1")
    assert by_run.model_name is None
    assert by_version.job_dir == "/scratch/jobs/train_model/r1/train/g0" and by_version.cluster == "slurm_default"
    assert by_version.checkpoint == "/scratch/jobs/train_model/r1/train/g0/checkpoints/last.ckpt"
    assert by_version.epochs == 2 and by_version.task == "hpctrain.tasks.surrogate.SurrogateRegressor"
    assert not by_version.has_artifact


def test_a_checkpoint_artifact_is_seen(store):
    client, _, rid = store
    assert resolve(client, rid).has_artifact


@pytest.mark.parametrize("reference, message", [
    ("models:/slurmflow-surrogate/9", "no such model version"),
    ("models:/slurmflow-surrogate@nobody", "no such model version"),
    ("models:/unknown-model/1", "no such model version"),
    ("ffffffffffffffffffffffffffffffff", "no MLflow run"),
])
def test_unknown_references_are_clear_errors(store, reference, message):
    with pytest.raises(LineageError, match=message):
        resolve(store[0], reference)


# -- what preflight checks ------------------------------------------------------------------------
PARENT = Parent(reference="models:/m/1", run_id=RUN_ID, model_name="m", model_version="1",
                job_dir="/scratch/jobs/a", cluster="slurm_default", task="hpctrain.tasks.surrogate.SurrogateRegressor",
                epochs=2)


def test_max_epochs_counts_the_parents_epochs():
    with pytest.raises(LineageError, match=r"max_epochs=2 is already reached.*trained 2 epoch\(s\).*above 2"):
        check_continuation(PARENT, params(max_epochs=2, init_from="models:/m/1"))
    check_continuation(PARENT, params(max_epochs=3, init_from="models:/m/1"))
    check_continuation(PARENT, params(max_epochs=1, init_from="models:/m/1", init_mode="weights"))  # a fresh schedule
    check_continuation(Parent(reference="x", run_id=RUN_ID), params(max_epochs=1))  # unknown: the job decides


def test_another_tasks_checkpoint_is_refused():
    with pytest.raises(LineageError, match="trained hpctrain.tasks.surrogate.SurrogateRegressor.*ECGClassifier"):
        check_continuation(PARENT, params(max_epochs=5), task="hpctrain.tasks.ecg.ECGClassifier")
    check_continuation(PARENT, params(max_epochs=5), task=PARENT.task)


# -- where the checkpoint comes from -------------------------------------------------------------
def test_the_parents_job_dir_on_the_same_cluster_first():
    seen = []
    kind, path = checkpoint_source(PARENT, "slurm_default", lambda p: seen.append(p) or True)
    assert (kind, path) == ("cluster", "/scratch/jobs/a/checkpoints/last.ckpt") and seen == [path]


def test_an_artifact_when_the_file_is_gone_or_on_another_cluster():
    with_artifact = Parent(**{**PARENT.as_dict(), "has_artifact": True})
    assert checkpoint_source(with_artifact, "slurm_default", lambda p: False) == ("artifact", CHECKPOINT_ARTIFACT)
    assert checkpoint_source(with_artifact, "archer2", lambda p: True) == ("artifact", CHECKPOINT_ARTIFACT)


def test_no_checkpoint_anywhere_is_a_clear_error():
    with pytest.raises(LineageError, match=r"last.ckpt is gone; the run has no checkpoints/last.ckpt artifact"):
        checkpoint_source(PARENT, "slurm_default", lambda p: False)
    with pytest.raises(LineageError, match="ran on cluster 'slurm_default', this run uses 'archer2'"):
        checkpoint_source(PARENT, "archer2", lambda p: True)
    with pytest.raises(LineageError, match="no slurm.job_dir tag"):
        checkpoint_source(Parent(reference="x", run_id=RUN_ID), "slurm_default", lambda p: True)


def test_a_staged_artifact_has_one_place_per_parent_run():
    assert staged_checkpoint_path("/home/u/slurmflow-jobs/", RUN_ID) == f"/home/u/slurmflow-jobs/init/{RUN_ID}/last.ckpt"
    with pytest.raises(LineageError):
        staged_checkpoint_path("/x", "../../etc")


def test_lineage_tags_of_the_continued_run():
    parent = {**PARENT.as_dict(), "mode": "weights"}
    assert lineage_tags(parent) == {PARENT_TAG: RUN_ID, INIT_FROM_TAG: "models:/m/1", INIT_MODE_TAG: "weights"}
    assert lineage_tags(None) == {}


# -- the job: copy once, then hpctrain starts from it -------------------------------------------------
def test_the_job_copies_the_parents_checkpoint_once_and_passes_it(tmp_path):
    parent_ckpt = tmp_path / "parent" / "checkpoints" / "last.ckpt"
    parent_ckpt.parent.mkdir(parents=True)
    parent_ckpt.write_bytes(b"the parent's state")
    conf = params(init_from="models:/m/1", init_mode="weights", max_epochs=5)
    job = training_job(conf, None, Site(partition="debug", account="", runtime="none"), "seed_everything: 1\n",
                       str(parent_ckpt))
    bin_dir, job_dir = tmp_path / "bin", tmp_path / "job"
    bin_dir.mkdir()
    job_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/bash\necho "argv=$*"\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURMFLOW_JOB_DIR": str(job_dir), "HOME": str(tmp_path)}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'cd "$SLURMFLOW_JOB_DIR"\n{job["command"]}'], env=env,
                              capture_output=True, text=True, timeout=30)

    out = run()
    assert out.returncode == 0, out.stderr
    assert (job_dir / INIT_CHECKPOINT).read_bytes() == b"the parent's state"
    assert f"--run.init_from={INIT_CHECKPOINT} --run.init_mode=weights" in out.stdout
    assert parent_ckpt.read_bytes() == b"the parent's state"  # only read
    # a requeued attempt: the copy is there, the parent's file need not be
    parent_ckpt.unlink()
    assert run().returncode == 0 and (job_dir / INIT_CHECKPOINT).exists()
    # a first attempt whose parent is gone fails clearly, before the container starts
    (job_dir / INIT_CHECKPOINT).unlink()
    out = run()
    assert out.returncode == 2 and "cannot copy the parent checkpoint" in out.stderr
    assert "argv=" not in out.stdout


def test_init_from_without_a_checkpoint_is_refused():
    with pytest.raises(ValueError, match="needs the parent's checkpoint"):
        training_job(params(init_from=RUN_ID), None, Site(partition="d", account="", runtime="none"), "a: 1\n")
    argv = training_argv(params(init_from=RUN_ID))
    assert f"--run.init_from={INIT_CHECKPOINT}" in argv and "--run.init_mode=resume" in argv


def test_a_config_naming_a_re_exported_task_class_is_the_class_the_training_records():
    """configs/surrogate.yaml says hpctrain.tasks.SurrogateRegressor; the training tags the run
    with where the class is defined: both name one class (found by the continuation e2e)."""
    from slurmflow.pipeline.preparation import canonical_class

    assert canonical_class("hpctrain.tasks.SurrogateRegressor") == "hpctrain.tasks.surrogate.SurrogateRegressor"
    assert canonical_class("hpctrain.tasks.surrogate.SurrogateRegressor") == "hpctrain.tasks.surrogate.SurrogateRegressor"
    assert canonical_class("nowhere.Thing") == "nowhere.Thing"
