"""The job directory: where one training run keeps everything it writes.

The Slurm job runs with ``cwd`` = its job directory and ``HPCTRAIN_JOB_DIR`` set to it
(docs/CONTRACTS.md). Every path the orchestrator reads afterwards is defined here, so the
layout has one source of truth.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
JOB_DIR_ENV = "HPCTRAIN_JOB_DIR"


def resolve_job_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Pick the job directory: an explicit value, else ``$HPCTRAIN_JOB_DIR``, else the cwd.

    :param explicit: a directory given on the command line (``--run.job_dir``), or ``None``.
    """
    chosen = explicit or os.environ.get(JOB_DIR_ENV) or os.getcwd()
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job directory.

    :param root: the job directory itself (absolute).
    """

    root: Path

    @property
    def result(self) -> Path:
        return self.root / RESULT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        # ModelCheckpoint(save_last=True) and the preemption callback both write this name, and
        # Lightning's ckpt_path="last" finds it, so a requeued job resumes without bookkeeping.
        return self.checkpoints / "last.ckpt"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def offline_store(self) -> Path:
        return self.root / "mlruns-offline"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (``tensorboard --logdir`` this folder)."""
        return self.root / "tensorboard"

    @property
    def mlperf_log(self) -> Path:
        """MLPerf HPC ``:::MLLOG`` lines of a task that names an MLPerf benchmark."""
        return self.root / "mlperf.log"

    @property
    def data_cache(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        """Small bookkeeping files that must survive a requeue (tracking run id, ...)."""
        return self.root / ".hpctrain"

    def relative(self, path: str | os.PathLike[str] | None) -> str | None:
        """Express ``path`` relative to the job directory when it lies inside it.

        Manifests store relative paths so a job directory can be copied off the cluster
        (rsync to the Airflow side) and still resolve.
        """
        if not path:
            return None
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def create(self) -> JobDir:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(exist_ok=True)
        return self


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write JSON so that readers see either the old file or the complete new one.

    The file is written to a temporary name in the same directory, fsynced, then renamed over the
    target: a job killed mid-write (Slurm time limit, node failure) never leaves a half manifest
    that the orchestrator would misread.

    :param path: destination file.
    :param payload: anything ``json.dumps`` accepts (``default=str`` covers paths and datetimes).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; the orchestrator may read as another user
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """Read a JSON file; ``None`` when missing or unreadable (e.g. truncated by an old writer)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
