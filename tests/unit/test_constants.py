"""slurmflow.constants holds the values DAG parsing needs; the modules they belong to re-export them."""

from __future__ import annotations

from slurmflow import constants, identity, images, sbatch
from slurmflow.operators import outcome
from slurmflow.states import SlurmState


def test_default_retry_states_are_slurm_states():
    """normalize_states returns the default unchecked (DAG parsing then needs no states module)."""
    assert constants.DEFAULT_RETRY_STATES == {SlurmState.NODE_FAIL.value, SlurmState.BOOT_FAIL.value,
                                              SlurmState.PREEMPTED.value}
    assert outcome.normalize_states(set(constants.DEFAULT_RETRY_STATES)) == constants.DEFAULT_RETRY_STATES
    assert outcome.normalize_states(constants.DEFAULT_RETRY_STATES) is constants.DEFAULT_RETRY_STATES


def test_modules_re_export_their_values():
    assert identity.XCOM_JOB_KEY == constants.XCOM_JOB_KEY == "slurm_job"
    assert identity.XCOM_LOG_OFFSETS == constants.XCOM_LOG_OFFSETS
    assert sbatch.DEFAULT_TEMPLATE == constants.DEFAULT_TEMPLATE
    assert (sbatch.TEMPLATE_DIR / sbatch.DEFAULT_TEMPLATE).is_file()
    assert images.DEFAULT_BASE_IMAGE == constants.DEFAULT_BASE_IMAGE
    assert images.DEFAULT_EXCLUDES == constants.DEFAULT_EXCLUDES
    assert outcome.DEFAULT_RETRY_STATES is constants.DEFAULT_RETRY_STATES


def test_the_dockerfile_default_base_image_is_the_constant():
    dockerfile = (sbatch.TEMPLATE_DIR.parents[1] / "docker" / "training.Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={constants.DEFAULT_BASE_IMAGE}" in dockerfile
