"""The three stages of ``experiment_pipeline`` as Slurm jobs: their params, commands and outputs.

Pure functions (no I/O). Each stage declares its params (:data:`STAGE_PARAMS`, names of DAG
Params), its inputs (:data:`~slurmflow.pipeline.stages.INPUTS`: upstream stages' outputs, copied
into ``in/<stage>/`` of its job directory) and its outputs (:data:`PUBLISH`: what of its job
directory is published as the cache entry). The containerised command is the training CLI:

* ``prepare``: ``hpctrain prepare out`` -> ``train.parquet``, ``holdout.parquet``, ``dataset.json``;
* ``train``: ``hpctrain fit`` on ``in/prepare/train.parquet`` -> the exported ``model/``;
* ``evaluate``: ``hpctrain evaluate`` of ``in/train`` on ``in/prepare/holdout.parquet`` -> ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from slurmflow.pipeline.experiments import STAGED_CONFIG, stage_config_lines
from slurmflow.pipeline.jobs import HPCTRAIN, Site, container_options, sbatch_options
from slurmflow.pipeline.stages import INPUTS, OUT_DIR, StageCache, stage_job_lines
from slurmflow.runtimes import container_command

#: stage -> the DAG Params that are its params (its key changes when one of them does)
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("rows", "holdout_rows", "data_seed", "noise"),
    "train": ("lr", "max_epochs", "batch_size", "width", "seed"),
    "evaluate": ("eval_batch_size",),
}
#: stage -> the folder of its job directory published as its cache entry
PUBLISH = {"prepare": OUT_DIR, "train": "model", "evaluate": OUT_DIR}
#: the training config of the train stage (its data path points at the prepared table)
TRAIN_CONFIG = "surrogate"
FEATURES = ["rw", "r", "Tu", "Hu", "Tl", "Hl", "L", "Kw"]
TARGETS = ["flow"]
#: the evaluate stage's result file, in its entry
METRICS_FILE = "metrics.json"
HOLDOUT_FILE = "holdout.parquet"


def stage_params(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's own params from the run's Params (what its key hashes)."""
    return {name: params[name] for name in STAGE_PARAMS[stage]}


def holdout_spec(path: str) -> dict[str, Any]:
    """The evaluate stage's data spec: every row of the held-out table (``hpctrain evaluate``)."""
    return {"class_path": "hpctrain.data.TabularDataModule",
            "init_args": {"path": path, "features": FEATURES, "targets": TARGETS}}


def stage_argv(stage: str, p: Mapping[str, Any]) -> list[str]:
    """The command the stage's container runs, in its job directory."""
    hpctrain = list(HPCTRAIN)
    if stage == "prepare":
        return [*hpctrain, "prepare", OUT_DIR, f"--rows={int(p['rows'])}", f"--holdout-rows={int(p['holdout_rows'])}",
                f"--seed={int(p['data_seed'])}", f"--noise={float(p['noise'])}"]
    if stage == "train":
        width = int(p["width"])
        return [*hpctrain, "fit", "--config", STAGED_CONFIG, "--data.path=in/prepare/train.parquet",
                f"--seed_everything={int(p['seed'])}", f"--trainer.max_epochs={int(p['max_epochs'])}",
                f"--model.lr={float(p['lr'])}", f"--data.batch_size={int(p['batch_size'])}",
                f"--model.hidden_sizes={json.dumps([width, width, max(width // 2, 1)])}",
                # the pipeline's one MLflow run is logged by its report step (stage params and keys)
                "--run.tracking=off"]
    if stage == "evaluate":
        return [*hpctrain, "evaluate", "--model", "in/train", "--data", STAGED_CONFIG, "--split", "all",
                f"--batch-size={int(p['eval_batch_size'])}", "--output", f"{OUT_DIR}/{METRICS_FILE}"]
    raise ValueError(f"unknown stage {stage!r}")


def stage_job(stage: str, params: Mapping[str, Any], image: str, site: Site, cache: StageCache, key: str,
              record: Mapping[str, Any], inputs: Mapping[str, str], config_text: str = "") -> dict[str, Any]:
    """The stage's Slurm job: ``{"command", "sbatch_options", "runtime"}``.

    :param params: the run's validated Params (resources included).
    :param record: :func:`~slurmflow.pipeline.stages.stage_record` of this key.
    :param inputs: upstream stage -> its cache entry on the cluster.
    :param config_text: the train stage's config (:data:`TRAIN_CONFIG`), staged into its job dir.
    """
    if sorted(inputs) != sorted(INPUTS[stage]):
        raise ValueError(f"stage {stage} takes the outputs of {list(INPUTS[stage])}, got {sorted(inputs)}")
    runtime = params.get("container_runtime") or site.runtime
    lines: list[str] = []
    if stage == "train":
        lines = stage_config_lines(config_text)
    elif stage == "evaluate":
        lines = stage_config_lines(json.dumps(holdout_spec(f"in/prepare/{HOLDOUT_FILE}"), indent=2) + "\n")
    run = container_command(runtime, image, stage_argv(stage, stage_params(stage, params)),
                            workdir="$SLURMFLOW_JOB_DIR", **container_options(params, site))
    compute = "\n".join([*lines, run.rstrip("\n")])
    command = stage_job_lines(cache, stage, key, compute, record, inputs, publish=PUBLISH[stage])
    return {"command": command, "sbatch_options": sbatch_options(params, site), "runtime": runtime}
