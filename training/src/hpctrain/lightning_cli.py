"""``HpcTrainCLI``: LightningCLI with the job-level behaviour of an HPC batch run.

LightningCLI parses and type-checks the config (unknown keys and wrong types fail before anything
is built), instantiates model, data module and Trainer, and makes every init argument a command
line flag (``--model.lr 0.01``, ``--data.batch_size 128``, ``--trainer.max_epochs 5``). On top of
it this class:

* resolves the job directory and refuses to retrain a job whose ``result.json`` is complete,
* installs the preemption signal latch and adds the checkpoint-and-stop callbacks,
* derives ``devices``/``num_nodes`` from the ``srun`` step and uses Lightning's
  ``SLURMEnvironment`` with ``auto_requeue=False`` (the batch script requeues on exit 75, see
  :mod:`hpctrain.preemption`),
* picks the MLflow target (server or offline store) and keeps one run across requeues,
* checks ``run.init_from`` (a parent run's checkpoint, :mod:`hpctrain.init`) before any compute.

:func:`check_fit_args` parses and type-checks a command line without building anything: the
orchestrator's preflight runs it on a config and its overrides.

It runs with ``run=False``: :mod:`hpctrain.fit` drives ``trainer.fit`` itself, so that checks
before compute, resume, export and the manifest happen in one place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from hpctrain import environment, tracking
from hpctrain.callbacks import AttemptLog, EpochHistory, ResumeStateCallback
from hpctrain.data.base import HpcDataModule
from hpctrain.errors import AlreadyComplete, ConfigError
from hpctrain.init import InitCheckpoint, InitWeights, load_init_checkpoint, recorded_init_checkpoint
from hpctrain.job import JOB_DIR_ENV, JobDir, resolve_job_dir
from hpctrain.manifest import is_complete, load_manifest
from hpctrain.options import RunOptions
from hpctrain.preemption import PreemptionCallback
from hpctrain.signals import SignalLatch, install_process_latch
from hpctrain.target import TargetStop
from hpctrain.tasks.base import TaskModule

log = logging.getLogger(__name__)

TRAINER_DEFAULTS: dict[str, Any] = {
    # Batch logs are files: a progress bar writes a line per refresh into the Slurm output.
    "enable_progress_bar": False,
    # Reproducible by default; on CPU this costs nothing measurable.
    "deterministic": True,
    "log_every_n_steps": 10,
}


def _step_layout(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(tasks per node, nodes)`` of the current ``srun`` step, if inside one."""
    env = os.environ if environ is None else environ
    tasks, nodes = env.get("SLURM_STEP_NUM_TASKS"), env.get("SLURM_STEP_NUM_NODES")
    if not (tasks and nodes and tasks.isdigit() and nodes.isdigit() and int(nodes) > 0):
        return None
    return max(1, int(tasks) // int(nodes)), int(nodes)


class HpcTrainCLI(LightningCLI):
    """LightningCLI for ``hpctrain fit``; see the module docstring.

    :param args: command line arguments after ``fit`` (``None``: ``sys.argv[2:]``).
    """

    def __init__(self, args: list[str] | None = None, *, parse_only: bool = False) -> None:
        self.parse_only = parse_only
        self.job: JobDir | None = None
        self.options: RunOptions | None = None
        self.latch: SignalLatch | None = None
        self.target: tracking.TrackingTarget | None = None
        self.history = EpochHistory()
        self.checkpoint_callback: ModelCheckpoint | None = None
        self.preemption_callback: PreemptionCallback | None = None
        self.attempts: AttemptLog | None = None
        self.target_stop: TargetStop | None = None
        #: the parent checkpoint of a continued job (``run.init_from``), and whether this attempt
        #: starts from it (False on a requeue: the job's own last.ckpt wins)
        self.init: InitCheckpoint | None = None
        self.init_active = False
        parser_kwargs: dict[str, Any] = {"prog": "hpctrain fit", "description": "Train an hpctrain task (Lightning)."}
        if parse_only:
            parser_kwargs["exit_on_error"] = False  # raise the parser's message instead of exiting
        super().__init__(
            model_class=TaskModule,
            datamodule_class=HpcDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,  # we write config.yaml ourselves, credentials redacted
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the task's --model.lr etc. are the only optimizer knobs
            parser_kwargs=parser_kwargs,
            args=args,
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunOptions, "run", fail_untyped=True)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Same as LightningCLI's, without its warning about args given while sys.argv is set:
        # sys.argv must keep "fit" because Lightning's DDP launcher re-executes it for rank > 0.
        self.config = (
            parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)
        )

    # -- after parsing, before anything is built ----------------------------------------------
    def before_instantiate_classes(self) -> None:
        if self.parse_only:
            raise _Parsed(self.config)
        config = self.config
        run = config.run
        self.job = JobDir(resolve_job_dir(run.job_dir)).create()
        # Children started by Lightning's DDP launcher and the data modules read it from here.
        os.environ[JOB_DIR_ENV] = str(self.job.root)
        if not run.smoke and is_complete(load_manifest(self.job.root)):
            raise AlreadyComplete(str(self.job.result))
        self.latch = install_process_latch(run.preemption_signal)

        threads = run.num_threads or environment.default_num_threads()
        if threads:
            torch.set_num_threads(threads)

        trainer = config.trainer
        layout = _step_layout()
        if layout and SLURMEnvironment.detect():
            tasks_per_node, nodes = layout
            if trainer.devices in (None, "auto"):
                trainer.devices = tasks_per_node
            if trainer.num_nodes in (None, 1) and nodes > 1:
                trainer.num_nodes = nodes
        if run.smoke:
            trainer.fast_dev_run = True
        if trainer.default_root_dir is None:
            trainer.default_root_dir = str(self.job.root)

    # -- the Trainer with our callbacks, logger and cluster environment ------------------------
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        assert self.job is not None and self.latch is not None
        run: RunOptions = self._get(self.config_init, "run")
        self.options = run
        model: TaskModule = self.model
        trainer_cfg: Namespace = self.config.trainer

        monitor = run.monitor or model.monitor
        mode = run.monitor_mode or model.monitor_mode
        if trainer_cfg.limit_val_batches in (0, 0.0) or getattr(self.datamodule, "val_fraction", None) == 0:
            monitor = None  # nothing validated: keep last.ckpt only
        self.checkpoint_callback = ModelCheckpoint(
            dirpath=self.job.checkpoints,
            filename="best-epoch{epoch:03d}-step{step}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_top_k=run.save_top_k if monitor else 0,
            save_last=True,
            # Always overwrite last.ckpt: the preemption callback writes the same file and
            # ckpt_path="last" must find the newest state under one name.
            enable_version_counter=False,
        )
        self.preemption_callback = PreemptionCallback(self.latch, self.job.last_checkpoint)
        self.attempts = AttemptLog(self.job.state / "attempts.json", environment.restart_count())
        if run.target is not None and monitor is None:
            raise ConfigError(f"run.target={run.target} needs a validated metric to reach, but nothing is validated")
        self.target_stop = TargetStop(monitor, mode, run.target)
        init_callbacks = self._load_init(run, trainer_cfg)
        callbacks = list(self._get(self.config_init, "trainer.callbacks") or [])
        callbacks += init_callbacks
        callbacks += [self.attempts, self.preemption_callback, ResumeStateCallback(), self.history,
                      self.target_stop, *self._mlperf_callbacks(run, monitor), self.checkpoint_callback]
        kwargs["callbacks"] = callbacks

        if trainer_cfg.logger is None or trainer_cfg.logger is True:
            # MLflow first: trainer.logger (the first one) is the run that fit.py tracks.
            loggers = [self._make_logger(run), self._tensorboard_logger(run)]
            kwargs["logger"] = [logger for logger in loggers if logger is not None] or False

        plugins = self._get(self.config_init, "trainer.plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            # Lightning's own requeue handler saves inside the signal handler; ours does not.
            plugins.append(SLURMEnvironment(auto_requeue=False))
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def _load_init(self, run: RunOptions, trainer_cfg: Namespace) -> list[Any]:
        """Check ``run.init_from``; the callback that loads weights only (``init_mode: weights``)."""
        assert self.job is not None
        if not run.init_from:
            return []
        requeued = self.job.last_checkpoint.exists()
        if requeued:
            # A requeued attempt of a continued job: its own checkpoint already holds the parent's
            # state and what it trained since; the parent's is recorded, not used.
            log.info("run.init_from=%s ignored: resuming this job's own %s", run.init_from, self.job.last_checkpoint)
            self.init = recorded_init_checkpoint(self.job, run.init_from, run.init_mode)
            return []
        max_epochs = trainer_cfg.max_epochs
        if max_epochs is None:  # Lightning's default: 1000 epochs unless max_steps bounds the run
            max_epochs = 1000 if trainer_cfg.max_steps in (None, -1) else -1
        self.init = load_init_checkpoint(self.job, run.init_from, run.init_mode, max_epochs)
        self.init_active = True
        log.info("continuing from %s (%s; the parent trained %d epoch(s))", self.init.path, run.init_mode,
                 self.init.epochs)
        return [InitWeights(self.init)] if run.init_mode == "weights" else []

    def _mlperf_callbacks(self, run: RunOptions, monitor: str | None) -> list[Any]:
        benchmark = getattr(self.model, "mlperf_benchmark", None)
        if not (run.mlperf and benchmark and monitor) or run.smoke:
            return []
        from hpctrain.mlperf import MLPerfLog  # only tasks with a benchmark need the package

        assert self.job is not None and self.target_stop is not None
        seed = self.config.seed_everything
        return [MLPerfLog(self.job.mlperf_log, benchmark, monitor, self.target_stop,
                          int(seed) if seed is not None else None)]

    def _tensorboard_logger(self, run: RunOptions) -> Any:
        """Event files in ``<job_dir>/tensorboard/`` (Lightning writes them on rank 0 only;
        without the ``tensorboard`` package it uses ``tensorboardX``, the image's choice)."""
        if not run.tensorboard:
            return None
        from lightning.pytorch.loggers import TensorBoardLogger

        assert self.job is not None
        # version "": no version_N subfolder, so a requeued attempt adds an event file to the same run
        return TensorBoardLogger(save_dir=self.job.root, name=self.job.tensorboard.name, version="",
                                 default_hp_metric=False)

    def _make_logger(self, run: RunOptions) -> Any:
        assert self.job is not None
        if rank_zero_only.rank != 0:
            # Only rank 0 logs; other ranks skip the probe and get an inert logger.
            self.target = tracking.TrackingTarget("offline", tracking.file_store_uri(self.job), "not rank 0")
        else:
            self.target = tracking.choose_target(self.job, run.tracking, run.tracking_uri, run.probe_timeout)
            log.info("MLflow tracking: %s (%s)", self.target.mode, self.target.reason)
        slurm = environment.slurm_facts()
        tags = {
            "hpctrain.job_dir": str(self.job.root),
            "hpctrain.task": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "hpctrain.version": environment.versions().get("hpctrain") or "unknown",
            **{
                f"slurm.{k[6:].lower()}": v
                for k, v in slurm.items()
                if k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID")
            },
            **run.tags,
        }
        sha = environment.git_sha()
        if sha:
            tags["mlflow.source.git.commit"] = sha
        run_name = run.run_name or slurm.get("SLURM_JOB_ID")
        return tracking.make_logger(self.target, run.experiment, run_name, tags)


class _Parsed(Exception):
    """Raised by a parse-only :class:`HpcTrainCLI` once the arguments are parsed."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


def check_fit_args(argv: list[str]) -> dict[str, Any]:
    """Parse and type-check ``hpctrain fit`` arguments without building or training anything.

    What the job's own parser would refuse (an unknown key, a wrong type, a class path that does
    not import, a config file that is not YAML) raises here with the parser's message.

    :param argv: the arguments after ``fit``, e.g. ``["--config", "ecg.yaml", "--model.lr=0.1"]``.
    :return: the parsed config as plain types (``model.class_path`` etc.).
    :raises ConfigError: the arguments do not parse.
    """
    try:
        HpcTrainCLI(args=argv, parse_only=True)
    except _Parsed as done:
        return done.config.as_dict()
    except SystemExit as exc:  # jsonargparse may still exit (e.g. --help)
        raise ConfigError(f"the arguments do not parse (exit {exc.code})") from exc
    except Exception as exc:
        raise ConfigError(str(exc).strip()) from exc
    raise ConfigError("the arguments were not parsed")  # pragma: no cover
