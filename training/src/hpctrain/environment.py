"""Facts about where a run executes: Slurm allocation, software versions, source revision.

Everything here is read from the process environment only (no network), so it works on
offline compute nodes and costs nothing at startup.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The Slurm variables the orchestrator cares about (job identity, placement, retries). Missing
# ones are simply absent from the manifest; a run outside Slurm has an empty dict.
SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NODELIST",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS",
    "SLURM_CLUSTER_NAME",
    "SLURM_RESTART_COUNT",
    "SLURM_SUBMIT_DIR",
)

GIT_SHA_ENV = "HPCTRAIN_GIT_SHA"


def slurm_facts(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return the Slurm variables present in ``environ`` (default: ``os.environ``).

    :param environ: mapping to read, for tests; defaults to the process environment.
    """
    env = os.environ if environ is None else environ
    return {name: env[name] for name in SLURM_VARIABLES if name in env}


def restart_count(environ: dict[str, str] | None = None) -> int:
    """How many times Slurm has requeued this job (``SLURM_RESTART_COUNT``, 0 when unset)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """The source revision: ``$HPCTRAIN_GIT_SHA`` (set at image build), else ``git rev-parse``.

    Inside a container there is usually no ``.git``; the image build bakes the SHA into the
    environment instead. ``git`` is only tried for editable installs from a checkout.
    """
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def versions() -> dict[str, str | None]:
    """Versions of the interpreter and the libraries that decide numerical results."""
    import torch

    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": _version("lightning"),
        "torchmetrics": _version("torchmetrics"),
        "mlflow": _version("mlflow-skinny") or _version("mlflow"),
        "hpctrain": _version("hpctrain"),
        "git_sha": git_sha(),
    }


def default_num_threads(environ: dict[str, str] | None = None) -> int | None:
    """Intra-op thread count implied by the allocation (``SLURM_CPUS_PER_TASK``), if any.

    torch otherwise uses every core of the node, oversubscribing it when several tasks share a
    node; Slurm's per-task CPU count is the right default there.
    """
    env = os.environ if environ is None else environ
    value = env.get("SLURM_CPUS_PER_TASK")
    return int(value) if value and value.isdigit() and int(value) > 0 else None
