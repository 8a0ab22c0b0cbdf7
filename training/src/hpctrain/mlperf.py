"""MLPerf HPC-style ``:::MLLOG`` lines for a task that names an MLPerf benchmark (DeepCam).

Written with the ``mlperf-logging`` package's own logger (``mlperf_logging.mllog``), to
``<job_dir>/mlperf.log`` and stdout (the Slurm job log), by rank 0 only, so that the package's
compliance checker reads them::

    python -m mlperf_logging.compliance_checker --usage hpc --ruleset 3.0.0 <job_dir>/mlperf.log

What is logged, and when:

* ``setup``: ``init_start``, the submission facts (division ``open``: our model and generated
  data are not the closed reference), ``cache_clear`` (false: nothing is cleared), seed, batch
  size, sample counts, optimizer, nodes and accelerators;
* ``on_train_start``: ``init_stop``, ``run_start``;
* each epoch: ``epoch_start``/``epoch_stop`` and ``eval_start``/``eval_stop``/``eval_accuracy``
  (the monitored metric, ``val/iou``), all with ``epoch_num`` (1-based, as MLPerf counts);
* the end: ``run_stop`` with ``status`` ``success`` when the quality target was reached
  (:class:`~hpctrain.target.TargetStop`), else ``aborted``.

A requeued job appends to the same file and continues it: the header and ``run_start`` are not
logged again (the checker wants exactly one of each), and a preempted attempt logs no ``run_stop``.

The shared ``mllog.config(filename=...)`` adds a file handler to one process-wide logger per
call; each job gets its own :class:`~mlperf_logging.mllog.mllog.MLLogger` over its own handlers
instead (same lines), so runs in one process never write into each other's files.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from mlperf_logging import mllog
from mlperf_logging.mllog import constants as C

from hpctrain.errors import Preempted
from hpctrain.target import TargetStop

#: the MLPerf HPC ruleset whose keys these lines follow (compliance checker ``--ruleset``)
RULESET = "3.0.0"
DIVISION = C.OPEN
STATUS = C.RESEARCH
ORG = "slurmflow"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class MLPerfLog(Callback):
    """Log the MLPerf HPC run structure of one training (rank 0).

    :param path: the log file (``<job_dir>/mlperf.log``), appended to.
    :param benchmark: the MLPerf benchmark name (``deepcam``).
    :param metric: the metric logged as ``eval_accuracy`` (``val/iou``).
    :param target: the run's :class:`~hpctrain.target.TargetStop` (decides ``run_stop``'s status).
    :param seed: the run's ``seed_everything`` value.
    :param stdout: also print the lines on stdout.
    """

    def __init__(self, path: str | os.PathLike[str], benchmark: str, metric: str, target: TargetStop,
                 seed: int | None, stdout: bool = True) -> None:
        self.path = Path(path)
        self.benchmark = benchmark
        self.metric = metric
        self.target = target
        self.seed = seed
        self.stdout = stdout
        self._mllogger: mllog.mllog.MLLogger | None = None
        self._handlers: list[logging.Handler] = []
        self._continuing = False
        self._stopped = False

    # -- the logger ---------------------------------------------------------------------------
    def _open(self) -> None:
        self._continuing = self.path.is_file() and f'"key": "{C.RUN_START}"' in self.path.read_text()
        logger = logging.Logger(f"hpctrain.mlperf.{id(self)}")  # unregistered: no global state
        self._handlers = [logging.FileHandler(self.path, mode="a", encoding="utf-8")]
        if self.stdout:
            self._handlers.append(logging.StreamHandler(sys.stdout))
        for handler in self._handlers:
            handler.setLevel(logging.INFO)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self._mllogger = mllog.mllog.MLLogger(logger=logger, default_stack_offset=2)

    def _close(self) -> None:
        for handler in self._handlers:
            handler.flush()
            if isinstance(handler, logging.FileHandler):
                handler.close()
        self._handlers, self._mllogger = [], None

    def _event(self, key: str, value: Any = None, **metadata: Any) -> None:
        if self._mllogger is not None:
            self._mllogger.event(key=key, value=value, metadata=metadata or None)

    def _start(self, key: str, **metadata: Any) -> None:
        if self._mllogger is not None:
            self._mllogger.start(key=key, value=None, metadata=metadata or None)

    def _end(self, key: str, **metadata: Any) -> None:
        if self._mllogger is not None:
            self._mllogger.end(key=key, value=None, metadata=metadata or None)

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self._open()
        if self._continuing:
            return
        self._start(C.INIT_START)
        for key, value in self._facts(trainer, pl_module).items():
            if value is not None:
                self._event(key, value)

    def _facts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = trainer.datamodule
        sizes = {}
        for split, key in (("train", C.TRAIN_SAMPLES), ("val", C.EVAL_SAMPLES)):
            try:
                sizes[key] = len(datamodule.dataset(split))
            except (AttributeError, RuntimeError, KeyError):
                sizes[key] = None
        batch = getattr(datamodule, "batch_size", None)
        accumulate = int(trainer.accumulate_grad_batches)
        gpus = trainer.num_devices if isinstance(trainer.accelerator, pl.accelerators.CUDAAccelerator) else 0
        cluster = os.environ.get("SLURM_CLUSTER_NAME") or platform.node() or "unknown"
        return {
            C.SUBMISSION_BENCHMARK: self.benchmark,
            C.SUBMISSION_ORG: ORG,
            C.SUBMISSION_DIVISION: DIVISION,
            C.SUBMISSION_STATUS: STATUS,
            C.SUBMISSION_PLATFORM: f"{cluster}: {trainer.num_nodes}x{trainer.num_devices} {type(trainer.accelerator).__name__}",
            C.CACHE_CLEAR: False,  # nothing is cleared before the run: logged as it is
            C.SEED: self.seed,
            "number_of_nodes": int(trainer.num_nodes),  # HPC keys the constants lack
            "accelerators_per_node": int(gpus),
            C.GLOBAL_BATCH_SIZE: int(batch) * int(trainer.world_size) * accumulate if batch else None,
            C.GRADIENT_ACCUMULATION_STEPS: accumulate,
            **sizes,
            C.OPT_NAME: "AdamW",  # TaskModule.configure_optimizers
            C.OPT_BASE_LR: _number(getattr(pl_module, "lr", None)),
            C.OPT_WEIGHT_DECAY: _number(getattr(pl_module, "weight_decay", None)),
            C.OPT_LR_WARMUP_STEPS: getattr(pl_module, "warmup_steps", None),
            "target_accuracy": self.target.target,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._continuing:
            return
        self._end(C.INIT_STOP)
        self._start(C.RUN_START)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._start(C.EPOCH_START, epoch_num=trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._end(C.EPOCH_STOP, epoch_num=trainer.current_epoch + 1)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._start(C.EVAL_START, epoch_num=trainer.current_epoch + 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        self._end(C.EVAL_STOP, epoch_num=epoch)
        value = _number(trainer.callback_metrics.get(self.metric))
        if value is not None:
            self._event(C.EVAL_ACCURACY, value, epoch_num=epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_stop(trainer, C.SUCCESS if self.target.reached else C.ABORTED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Preempted):  # a preempted run goes on in the next attempt
            self._run_stop(trainer, C.ABORTED)
        self._close()

    def _run_stop(self, trainer: pl.Trainer, status: str) -> None:
        if not trainer.is_global_zero or self._stopped:
            return
        self._stopped = True
        metadata: dict[str, Any] = {C.STATUS: status, C.EPOCH_NUM: trainer.current_epoch}
        if self.target.time_to_target_s is not None:
            metadata["time_to_target_s"] = self.target.time_to_target_s
        self._end(C.RUN_STOP, **metadata)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()
