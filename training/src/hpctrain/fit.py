"""``hpctrain fit``: one attempt of a training job, from config to ``result.json``.

1. Parse and type-check the config (LightningCLI); a complete ``result.json`` ends here (exit 0).
2. Check the data source cheaply (file exists, columns present, query non-empty): exit 2.
3. ``trainer.fit`` resuming from ``checkpoints/last.ckpt`` when a previous attempt left one;
   else, for a continued job (``run.init_from``, :mod:`hpctrain.init`), from the parent's checkpoint.
4. On the preemption signal: checkpoint, manifest ``status: preempted``, exit 75 (the launcher
   requeues the job: slurmflow's batch script runs ``scontrol requeue`` on the node).
5. Export the best model, write ``result.json`` atomically, log artifacts to MLflow.

Exit codes: 0 done (or already done), 2 config error, 75 preempted, 1 anything else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from hpctrain import environment, mlflow_model, tracking
from hpctrain.errors import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, AlreadyComplete, ConfigError, Preempted
from hpctrain.export import export_model, load_model, rebuild
from hpctrain.job import JobDir
from hpctrain.lightning_cli import HpcTrainCLI
from hpctrain.manifest import utc_now, write_manifest
from hpctrain.redact import redact

log = logging.getLogger("hpctrain")


def _plain(value: Any) -> Any:
    """JSON round trip: plain types only (also what ``torch.load(weights_only=True)`` accepts)."""
    return json.loads(json.dumps(value, default=str))


def _metrics(trainer: Any) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        out[key] = number
    return out


class FitJob:
    """One ``fit`` attempt built from an instantiated :class:`HpcTrainCLI`.

    :param cli: the parsed and instantiated command line.
    """

    def __init__(self, cli: HpcTrainCLI) -> None:
        assert cli.job is not None and cli.options is not None
        self.cli = cli
        self.job: JobDir = cli.job
        self.options = cli.options
        self.model = cli.model
        self.datamodule = cli.datamodule
        self.trainer = cli.trainer
        self.started_at = utc_now()
        self._t0 = time.monotonic()
        self.resumed_from: str | None = None

    @property
    def is_rank_zero(self) -> bool:
        return bool(self.trainer.is_global_zero)

    # -- pieces of the manifest ------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        dumped = self.cli.parser.dump(self.cli.config, format="yaml", skip_none=False)
        return redact(yaml.safe_load(dumped))

    def hyperparameters(self) -> dict[str, Any]:
        cfg = self.config_dict()
        trainer_keys = (
            "max_epochs",
            "max_steps",
            "accumulate_grad_batches",
            "precision",
            "gradient_clip_val",
            "devices",
            "num_nodes",
            "strategy",
            "accelerator",
        )
        return _plain(
            {
                "model": {"class_path": cfg["model"]["class_path"], **self.model.export_init_args()},
                "data": cfg["data"],
                "trainer": {k: cfg["trainer"].get(k) for k in trainer_keys},
            }
        )

    def _tracking_section(self) -> dict[str, Any] | None:
        target = self.cli.target
        logger = self.trainer.logger
        if target is None or logger is None or not hasattr(logger, "run_id"):
            return None
        return {
            "mode": target.mode,
            "tracking_uri": target.tracking_uri,
            "reason": target.reason,
            "experiment": self.options.experiment,
            "run_id": logger.run_id,
            "offline_store": self.job.relative(self.job.offline_store) if target.mode == "offline" else None,
        }

    def base_manifest(self, status: str) -> dict[str, Any]:
        seed = int(self.cli.config.seed_everything) if self.cli.config.seed_everything is not None else None
        try:
            data = self.datamodule.data_identity()
        except RuntimeError:
            data = None  # never set up (failed before the data was read)
        ckpt = self.cli.checkpoint_callback
        return {
            "status": status,
            "smoke": bool(self.options.smoke),
            "job_dir": str(self.job.root),
            "task": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "datamodule": f"{type(self.datamodule).__module__}.{type(self.datamodule).__qualname__}",
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "seed": seed,
            "hyperparameters": self.hyperparameters(),
            "data": _plain(data) if data is not None else None,
            "versions": environment.versions(),
            "slurm": environment.slurm_facts(),
            "mlflow": self._tracking_section(),
            "training": {
                "global_step": int(self.trainer.global_step),
                "epochs_completed": int(self.trainer.current_epoch),
                "resumed_from": self.job.relative(self.resumed_from),
                "init_from": self.cli.init.summary(self.job) if self.cli.init is not None else None,
                "restart_count": environment.restart_count(),
                "attempt_seconds": round(time.monotonic() - self._t0, 3),
                "last_checkpoint": self.job.relative(self.job.last_checkpoint)
                if self.job.last_checkpoint.exists()
                else None,
                "attempts": self._close_attempt(status),
            },
            "monitor": {"metric": ckpt.monitor if ckpt else None, "mode": ckpt.mode if ckpt else None},
            **self._target_fields(),
            **self._side_logs(),
        }

    def _target_fields(self) -> dict[str, Any]:
        stop = self.cli.target_stop
        if stop is None:
            return {"target": None, "target_reached": None, "time_to_target_s": None}
        return stop.summary()

    def _side_logs(self) -> dict[str, str | None]:
        """The TensorBoard folder and the MLPerf log, relative, when the run wrote them."""
        tensorboard, mlperf_log = self.job.tensorboard, self.job.mlperf_log
        return {
            "tensorboard": self.job.relative(tensorboard) if tensorboard.is_dir() and any(tensorboard.iterdir()) else None,
            "mlperf_log": self.job.relative(mlperf_log) if mlperf_log.is_file() else None,
        }

    def _close_attempt(self, status: str) -> list[dict[str, Any]]:
        """This attempt's row closed with ``status``, after the rows of the earlier attempts."""
        attempts = self.cli.attempts
        if attempts is None:
            return []
        try:
            return attempts.finish(status, int(self.trainer.global_step))
        except OSError as exc:  # bookkeeping: never the reason a training fails
            log.warning("could not record the attempt: %s", exc)
            return attempts.rows()

    # -- the attempt ------------------------------------------------------------------------
    def run(self) -> int:
        self.datamodule.check()  # ConfigError before any compute
        latch = self.cli.latch
        if latch is not None and latch.triggered:
            # Preempted while starting up: nothing new to save.
            raise Preempted(str(self.job.last_checkpoint) if self.job.last_checkpoint.exists() else None)
        if self.job.last_checkpoint.exists():
            self.resumed_from = str(self.job.last_checkpoint)
            log.info("resuming from %s", self.resumed_from)
            # A resumed job's checkpoint directory is not empty by design.
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        elif self.cli.init_active and self.cli.init is not None and self.cli.init.mode == "resume":
            # A continued job: model, optimizer, scheduler, loops and epoch from the parent's checkpoint.
            self.resumed_from = str(self.cli.init.path)
            log.info("continuing from %s at epoch %d", self.resumed_from, self.cli.init.epochs)
        self._start_tracking()
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.resumed_from)
        if self.trainer.interrupted:
            raise RuntimeError("training was interrupted")
        if self.is_rank_zero:
            self._finish()
        return 0

    def _start_tracking(self) -> None:
        logger = self.trainer.logger
        if not self.is_rank_zero or self.cli.target is None or not hasattr(logger, "run_id"):
            return
        run_id = logger.run_id  # creates (or reopens) the MLflow run now, not at the first metric
        tracking.remember_run(self.job, self.cli.target, run_id, logger.experiment_id)
        config = self.config_dict()
        params = {
            "seed": config.get("seed_everything"),
            "data": config.get("data"),
            "trainer": {k: v for k, v in config["trainer"].items() if not isinstance(v, dict | list)},
        }
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        logger = self.trainer.logger
        if self.cli.target is None or not hasattr(logger, "run_id"):
            return
        try:
            logger.log_hyperparams(params)
        except Exception as exc:  # MLflow params are immutable: a requeue with a changed config
            log.warning("could not log params to MLflow (changed since the first attempt?): %s", exc)

    def _finish(self) -> None:
        ckpt = self.cli.checkpoint_callback
        best_path = ckpt.best_model_path if ckpt and ckpt.best_model_path else None
        export_from = "best" if best_path else "last"
        model = self.model
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            model = rebuild(
                f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                self.model.export_init_args(),
                state,
            )
        history = self.cli.history.rows
        monitor, mode = (ckpt.monitor, ckpt.mode) if ckpt else (None, "min")
        best = self.cli.history.best(monitor, mode) if monitor else None
        if best is None and ckpt is not None and ckpt.best_model_score is not None:
            best = {monitor: float(ckpt.best_model_score)}
        metrics = {"final": _metrics(self.trainer), "best": best, "history": history}

        manifest = self.base_manifest("completed")
        example = self._example_input()
        model_info = export_model(
            model.cpu(),
            self.job.model,
            example_input=example,
            program=self.options.export_program,
            metadata=_plain(
                {
                    "task": manifest["task"],
                    "data": manifest["data"],
                    "metrics_best": best,
                    "weights": export_from,
                }
            ),
        )
        model_info["weights"] = export_from
        if example is not None:
            # The registry's artifact: an MLflow Model in the same folder (no server needed).
            # Rebuilt from model.pt: a clean module in eval mode, without a trainer to pickle.
            mlflow_model.save(load_model(self.job.model), self.job.model, example, feature_names=getattr(self.datamodule, "features", None),
                              metadata_={"hpctrain_format": model_info["format"], "task": manifest["task"]})
            model_info["mlflow_model"] = mlflow_model.MLMODEL_FILE
        model_info["path"] = self.job.relative(model_info["path"])
        model_info["program_path"] = self.job.relative(model_info["program_path"])
        manifest.update(
            {
                "metrics": metrics,
                "best_checkpoint": self.job.relative(best_path),
                "model": model_info,
            }
        )
        self._log_params({k: self.model.hparams.get(k) for k in self.model.shape_keys})
        config_path = self.job.root / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config_dict(), sort_keys=False))
        write_manifest(self.job, manifest)
        self._log_artifacts(config_path)
        log.info("training complete: %s", self.job.result)

    def _example_input(self) -> torch.Tensor | None:
        for split in ("val", "train"):
            try:
                dataset = self.datamodule.dataset(split)
            except (RuntimeError, KeyError):
                continue
            if len(dataset) >= 1:
                return torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])
        return None

    def _log_artifacts(self, config_path: Path) -> None:
        logger = self.trainer.logger
        if self.cli.target is None or not hasattr(logger, "run_id") or self.options.smoke:
            return
        client, run_id = logger.experiment, logger.run_id
        try:
            client.log_artifact(run_id, str(self.job.result))
            client.log_artifact(run_id, str(config_path))
            client.log_artifacts(run_id, str(self.job.model), "model")
        except Exception as exc:  # the manifest on disk is the source of truth; MLflow is a copy
            log.warning("could not log artifacts to MLflow: %s", exc)

    def record_stop(self, status: str, error: str | None = None) -> None:
        """Write a non-final manifest (``preempted`` / ``failed``) for the orchestrator."""
        if not self.is_rank_zero:
            return
        manifest = self.base_manifest(status)
        if error:
            manifest["error"] = error
        try:
            write_manifest(self.job, manifest)
        except Exception as exc:
            log.warning("could not write %s manifest: %s", status, exc)


def _mark_run(job: FitJob, status: str) -> None:
    # Lightning finalizes the MLflow run as FAILED on any exception; a preempted run is KILLED.
    logger = job.trainer.logger
    if job.is_rank_zero and hasattr(logger, "run_id") and job.cli.target is not None:
        try:
            logger.experiment.set_terminated(logger.run_id, status)
        except Exception as exc:
            log.warning("could not mark MLflow run %s: %s", status, exc)


def _config_error_in(exc: BaseException) -> ConfigError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def run_fit(argv: list[str]) -> int:
    """Run ``hpctrain fit`` with ``argv`` (the arguments after ``fit``); return the exit code.

    :param argv: e.g. ``["--config", "configs/surrogate.yaml", "--model.lr", "0.01"]``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Lightning warns on every machine with Slurm installed that a process not started by srun
    # is not using srun; single-process runs (tests, the batch step) are deliberate.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
    try:
        cli = HpcTrainCLI(args=argv)
    except AlreadyComplete as done:
        print(f"hpctrain: {done}", flush=True)
        return 0
    except Exception as exc:
        # A ConfigError raised by a constructor reaches us wrapped by jsonargparse.
        cause = _config_error_in(exc)
        if cause is None:
            raise
        print(f"hpctrain: config error: {cause}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    job = FitJob(cli)
    try:
        return job.run()
    except Preempted as stop:
        job.record_stop("preempted")
        _mark_run(job, "KILLED")
        print(f"hpctrain: {stop}; exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except ConfigError as exc:
        job.record_stop("failed", f"config error: {exc}")
        print(f"hpctrain: config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except Exception as exc:
        job.record_stop("failed", "".join(traceback.format_exception_only(exc)).strip())
        raise
