"""Every resource shape of the ARCHER2 DeepCam seed (003) from train_model's Params.

The seed's GPU script (2 nodes, 8 GPUs in all, 4 tasks per node bound to cores 0, 8, 16, 24,
``--qos=gpu-exc --exclusive``, srun ``--hint=nomultithread``) and its CPU script (32 nodes x 1
task x 128 CPUs, ``--exclusive``) are rebuilt here from Params alone; README ("Resource shapes")
shows the same two confs.
"""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest

from slurmflow.pipeline.jobs import Site, sbatch_options, training_job
from slurmflow.pipeline.params import EXTRA_SBATCH, train_params
from slurmflow.sbatch import OPTIONS, SbatchOptionError, build_script, render_script

SITE = Site(partition="debug", account="research", runtime="apptainer")
#: the experiment config a job carries (a stand-in: the golden file must not change with deepcam.yaml)
CONFIG = "# deepcam.yaml would be here\nseed_everything: 42\n"
IMAGE = "registry.example/slurmflow/training@sha256:" + "a" * 64

DEEPCAM_GPU = {"task": "deepcam", "account": "z19", "partition": "gpu", "qos": "gpu-exc", "nodes": 2, "gpus": 8,
               "ntasks_per_node": 4, "time_limit": "01:00:00", "exclusive": True,
               "cpu_bind": "verbose,map_cpu:0,8,16,24", "hint": "nomultithread"}
DEEPCAM_CPU = {"task": "deepcam", "account": "z19", "partition": "standard", "qos": "standard", "nodes": 32,
               "ntasks_per_node": 1, "cpus_per_task": 128, "time_limit": "10:00:00", "exclusive": True,
               "hint": "nomultithread"}


def params(**conf):
    """The run's Params as Airflow resolves them: the defaults, then the conf."""
    merged = {name: p.value for name, p in train_params().items()}
    merged.update(conf)
    for name, value in conf.items():  # what the Trigger form / REST API would refuse
        jsonschema.validate(value, train_params()[name].schema)
    return merged


def sbatch_lines(conf: dict) -> tuple[list[str], str]:
    job = training_job(params(**conf), IMAGE, SITE, CONFIG)
    script = build_script(command=job["command"], job_name="train.x.g0", job_dir="/scratch/u/jobs/x",
                          options=job["sbatch_options"])
    text = render_script(script)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")], job["command"]


def test_the_seeds_gpu_script_from_params():
    lines, command = sbatch_lines(DEEPCAM_GPU)
    for expected in ("--partition=gpu", "--account=z19", "--qos=gpu-exc", "--nodes=2", "--gpus=8",
                     "--ntasks-per-node=4", "--time=01:00:00", "--exclusive", "--hint=nomultithread"):
        assert f"#SBATCH {expected}" in lines
    assert not any("--gpus-per-node" in line for line in lines)
    # one process per GPU through srun, bound as the seed binds them (srun's option: sbatch has none)
    assert "srun --kill-on-bad-exit=0 --wait=60 --cpu-bind=verbose,map_cpu:0,8,16,24 " in command
    assert " --nv " in command or "--nv" in command.split(), "GPUs requested in total reach the container too"


def test_the_seeds_cpu_script_from_params():
    lines, command = sbatch_lines(DEEPCAM_CPU)
    for expected in ("--partition=standard", "--qos=standard", "--nodes=32", "--ntasks-per-node=1",
                     "--cpus-per-task=128", "--time=10:00:00", "--exclusive", "--hint=nomultithread"):
        assert f"#SBATCH {expected}" in lines
    assert not any("--gpus" in line for line in lines)
    assert command.startswith("srun --kill-on-bad-exit=0 --wait=60 ") or "srun --kill-on-bad-exit=0 --wait=60 " in command


def test_a_single_task_with_a_cpu_binding_goes_through_srun():
    _, command = sbatch_lines({"cpu_bind": "cores"})
    assert "srun --kill-on-bad-exit=0 --wait=60 --cpu-bind=cores " in command
    _, plain = sbatch_lines({})
    assert "srun" not in plain


def test_total_gpus_and_gpus_per_node_together_are_refused():
    with pytest.raises(ValueError, match="gpus=8 and gpus_per_node=4: set one of them"):
        sbatch_options(params(gpus=8, gpus_per_node=4), SITE)


def test_other_options_by_name_are_checked_by_their_own_pattern():
    lines, _ = sbatch_lines({"sbatch_extra": {"mail_type": "END,FAIL", "reservation": "mlperf", "cpu_freq": "2250000"}})
    assert {"#SBATCH --mail-type=END,FAIL", "#SBATCH --reservation=mlperf", "#SBATCH --cpu-freq=2250000"} <= set(lines)
    with pytest.raises(SbatchOptionError, match="mail_user"):  # passes the form's charset, not the option's check
        sbatch_lines({"sbatch_extra": {"mail_user": "nobody"}})
    with pytest.raises(ValueError, match="sbatch_extra sets qos: use the Param"):
        sbatch_options({**params(), "sbatch_extra": {"qos": "x"}}, SITE)  # the form refuses it first


@pytest.mark.parametrize("extra, reason", [
    ({"job_name": "x"}, "is not one of"),  # set by slurmflow (the exactly-once key)
    ({"qos": "high"}, "is not one of"),  # has its own Param
    ({"reservation": "a b"}, "does not match"),
    ({"mail_type": "END;reboot"}, "does not match"),
    ({"begin": "$(id)"}, "does not match"),
])
def test_the_trigger_form_refuses_other_names_and_shell_syntax(extra, reason):
    with pytest.raises(jsonschema.ValidationError, match=reason):
        jsonschema.validate(extra, train_params()["sbatch_extra"].schema)


def test_the_extra_allow_list_is_a_subset_of_what_sbatch_checks():
    assert set(EXTRA_SBATCH) <= set(OPTIONS)
    assert not set(EXTRA_SBATCH) & set(train_params()), "an option with its own Param is set through it"


# --- GPU wire-up: one process per GPU, NCCL's interface from the site, a golden script ----------

GOLDEN = Path(__file__).parent / "golden" / "jobs"
UPDATE = os.environ.get("SLURMFLOW_UPDATE_GOLDEN") == "1"
GPU_SITE = Site(partition="gpu", account="z19", runtime="podman-hpc", tracking_uri="https://mlflow.example",
                extra_env={"NCCL_SOCKET_IFNAME": "hsn", "NCCL_DEBUG": "WARN"})


def test_two_node_gpu_ddp_job_is_rendered_as_the_golden_file():
    """2 nodes x 4 GPUs, four tasks per node, each task one process of DDP with its closest GPU,
    NCCL told the site's high-speed interface; regenerate with SLURMFLOW_UPDATE_GOLDEN=1."""
    conf = {"task": "deepcam", "nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
            "gpu_bind": "closest", "time_limit": "01:00:00", "exclusive": True}
    job = training_job(params(**conf), IMAGE, GPU_SITE, CONFIG)
    script = build_script(command=job["command"], job_name="train.0123456789ab.g0",
                          job_dir="/pscratch/u/slurmflow-jobs/train_model/r1/train/g0", options=job["sbatch_options"])
    text = render_script(script)
    path = GOLDEN / "deepcam-2x4-gpu.sbatch"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with SLURMFLOW_UPDATE_GOLDEN=1"
    assert text == path.read_text()
    assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --gpu-bind=closest" in text
    assert 'srun --kill-on-bad-exit=0 --wait=60 podman-hpc --squash-dir "$sf_sqdir" run' in text and "--gpu" in text
    assert "NCCL_SOCKET_IFNAME=hsn" in text


@pytest.mark.parametrize("conf, reason", [
    ({"nodes": 2, "ntasks_per_node": 2, "gpus_per_node": 4}, "ntasks_per_node=2 but 4 GPU"),
    ({"nodes": 2, "ntasks_per_node": 1, "gpus": 8}, "set ntasks_per_node=4"),
    ({"nodes": 3, "ntasks_per_node": 1, "gpus": 8}, "does not split evenly"),
])
def test_gpus_and_processes_must_pair_up(conf, reason):
    with pytest.raises(ValueError, match=reason):
        sbatch_options(params(**conf), SITE)


def test_the_training_runs_without_the_job_dir_on_its_import_path():
    """The container's working directory is the job dir: with `python -m` alone its folders
    (`tensorboard/` after a first attempt) shadowed installed packages."""
    from slurmflow.pipeline.jobs import training_argv
    from slurmflow.pipeline.params import train_params

    params = {name: p.value for name, p in train_params().items()}
    assert training_argv(params)[:4] == ["python", "-P", "-m", "hpctrain"]
