"""The ``run:`` section of a training config: job-level settings that are not Trainer arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpctrain.signals import DEFAULT_SIGNAL


@dataclass
class RunOptions:
    """Job-level settings (``--run.<name>`` on the command line).

    :param job_dir: where the run writes; default ``$HPCTRAIN_JOB_DIR``, else the cwd.
    :param experiment: MLflow experiment name.
    :param run_name: MLflow run name (default: the Slurm job id, else MLflow's choice).
    :param tags: extra MLflow tags.
    :param tracking: ``auto`` (server if reachable, else offline store), ``online``, ``offline``
        or ``off``.
    :param tracking_uri: MLflow server; default ``$MLFLOW_TRACKING_URI``.
    :param probe_timeout: seconds to wait for the tracking server before going offline.
    :param monitor: metric that picks the best checkpoint (default: the task's, e.g. ``val/loss``).
    :param monitor_mode: ``min`` or ``max`` (default: the task's).
    :param save_top_k: best checkpoints kept besides ``last.ckpt``.
    :param preemption_signal: the signal announcing preemption (``sbatch --signal=B:USR2@60``).
    :param num_threads: torch intra-op threads (default: ``$SLURM_CPUS_PER_TASK`` when set).
    :param smoke: a fast dev run (one batch of train and validation) for pipeline tests; its
        manifest is marked ``smoke`` and never counts as a finished job.
    :param export_program: also export a ``torch.export`` program (``model.pt2``) for serving.
    :param target: quality target of the monitored metric (e.g. ``val/iou`` 0.8): training stops
        at the first validation that reaches it (``>=`` for ``max``, ``<=`` for ``min``
        metrics), and the manifest records ``time_to_target_s``; ``None`` trains every epoch.
    :param tensorboard: also write TensorBoard event files into ``<job_dir>/tensorboard/``.
    :param mlperf: write MLPerf HPC ``:::MLLOG`` lines (``<job_dir>/mlperf.log`` and stdout) for
        a task that names an MLPerf benchmark (``deepcam``); never in smoke runs.
    :param init_from: a checkpoint of an earlier run to start from (relative paths resolve against
        the job directory): continue a previous experiment. Used only when the job has no
        ``checkpoints/last.ckpt`` of its own: a requeued attempt resumes from its own checkpoint.
    :param init_mode: ``resume``: model, optimizer, scheduler, loop counters and epoch come from
        ``init_from`` (``trainer.max_epochs`` counts all epochs, the parent's included, and must be
        above them); ``weights``: only the model's weights, with a fresh optimizer at epoch 0.
    """

    job_dir: str | None = None
    experiment: str = "hpctrain"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    tracking: Literal["auto", "online", "offline", "off"] = "auto"
    tracking_uri: str | None = None
    probe_timeout: float = 3.0
    monitor: str | None = None
    monitor_mode: Literal["min", "max"] | None = None
    save_top_k: int = 1
    preemption_signal: str = DEFAULT_SIGNAL
    num_threads: int | None = None
    smoke: bool = False
    export_program: bool = True
    target: float | None = None
    tensorboard: bool = True
    mlperf: bool = True
    init_from: str | None = None
    init_mode: Literal["resume", "weights"] = "resume"
