"""Paths, generated dev secrets and config rendering for the local stack.

Everything the stack writes lives under one git-ignored folder (``.stack`` by default,
``SLURMFLOW_STACK_DIR`` to move it). Secrets are generated once and kept in
``.stack/secrets.env`` (mode 600); ``.stack/stack.env`` is what tests and tools read.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from string import Template

from . import nodes

REPO = Path(__file__).resolve().parents[2]
STACK = Path(os.environ.get("SLURMFLOW_STACK_DIR", REPO / ".stack")).resolve()
VENV_BIN = REPO / ".venv" / "bin"
TEMPLATES = REPO / "include" / "stack"

CLUSTER_USER = "hpcuser"
SLURM_ACCOUNT = "research"
SLURM_PARTITION = "debug"
REGISTRY = "127.0.0.1:5000"
#: What the locally made base image holds (debootstrap --include): Python for the training venv,
#: and Debian's redis-server, the staging store online_training runs inside its job (docs/online-training-slurm.md).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "redis-server")
# The tag names the package list, so changing it builds a new base (and so a new training image).
BASE_IMAGE_REPO = "slurmflow/base"
BASE_IMAGE_TAG = "bookworm-" + hashlib.sha256(",".join(BASE_PACKAGES).encode()).hexdigest()[:8]
BASE_IMAGE = f"{REGISTRY}/{BASE_IMAGE_REPO}:{BASE_IMAGE_TAG}"
PG_PORT = 5433  # not 5432: leave the machine's own PostgreSQL cluster alone
REDIS_PORT = 6380  # the Celery broker; not 6379: leave that to a Redis of the machine's own
AIRFLOW_USER = AIRFLOW_PASSWORD = "admin"  # dev-only login, documented in the README

# Names of the generated secrets; values live only in .stack/secrets.env.
SECRET_NAMES = (
    "PG_AIRFLOW_PASSWORD",
    "PG_MLFLOW_PASSWORD",
    "MARIADB_SLURM_PASSWORD",
    "REGISTRY_PASSWORD",
    "REGISTRY_HTTP_SECRET",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "REDIS_PASSWORD",
)

# The Airflow executor of the stack, chosen by `make up EXECUTOR=...` (``up --executor``) and
# remembered in .stack/executor, so that `make status`, the tools and a later `make up` see the
# programs that really run.
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
EXECUTOR_FILE = STACK / "executor"


SLURM_CONF = STACK / "etc" / "slurm" / "slurm.conf"
SSH_KEY = STACK / "keys" / "id_ed25519"
CLUSTER_HOME = STACK / "home" / CLUSTER_USER


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.startswith("#")}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a mode-600 file, never world-readable even for a moment.

    Written aside and renamed into place: a reader (a tool calling :func:`load_secrets` while
    ``make up`` adds a new secret) sees the old file or the new one, never an empty one, which
    would make it generate every secret anew.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_secrets() -> dict[str, str]:
    """Return the dev secrets, generating the missing ones once (kept across ``make up``)."""
    path = STACK / "secrets.env"
    values = _read_env_file(path)
    missing = [n for n in SECRET_NAMES if not values.get(n)]
    if missing:
        values.update({n: secrets.token_urlsafe(24) for n in missing})
        _write_private(path, "".join(f"{k}={v}\n" for k, v in sorted(values.items())))
    return values


def stack_executor() -> str:
    """The stack's executor (a key of :data:`EXECUTORS`): the one the last ``make up`` chose."""
    name = EXECUTOR_FILE.read_text().strip() if EXECUTOR_FILE.exists() else "local"
    return name if name in EXECUTORS else "local"


def remember_executor(name: str) -> None:
    """Record the executor ``make up`` starts the stack with (see :func:`stack_executor`)."""
    if name not in EXECUTORS:
        raise SystemExit(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    EXECUTOR_FILE.parent.mkdir(parents=True, exist_ok=True)
    EXECUTOR_FILE.write_text(name + "\n")


def template_vars() -> dict[str, str]:
    """Variables available to the templates in include/stack/."""
    return {
        "STACK_DIR": str(STACK),
        "REPO": str(REPO),
        "HOSTNAME": socket.gethostname().split(".")[0],
        "CLUSTER_USER": CLUSTER_USER,
        "REDIS_PORT": str(REDIS_PORT),
        "NODE1_ADDR": nodes.ADDRESSES["local1"],
        "NODE2_ADDR": nodes.ADDRESSES["local2"],
        **load_secrets(),
    }


def render(template: str, dest: Path, mode: int = 0o644) -> None:
    """Fill ``include/stack/<template>`` with :func:`template_vars` into ``dest``."""
    text = Template((TEMPLATES / template).read_text()).substitute(template_vars())
    if mode & 0o077 == 0:
        _write_private(dest, text)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        os.chmod(dest, mode)


def stack_env() -> dict[str, str]:
    """What tests, tools and ``airflow_settings.yaml`` need to reach the local services."""
    s = load_secrets()
    return {
        "STACK_DIR": str(STACK),
        "SSH_HOST": "127.0.0.1",
        "SSH_PORT": "2222",
        "SSH_USER": CLUSTER_USER,
        "SSH_KEY": str(SSH_KEY),
        "SLURM_CONF": str(SLURM_CONF),
        "SLURM_PARTITION": SLURM_PARTITION,
        "SLURM_ACCOUNT": SLURM_ACCOUNT,
        "CLUSTER_JOB_ROOT": str(CLUSTER_HOME / "slurmflow-jobs"),
        "REGISTRY": "127.0.0.1:5000",
        "REGISTRY_USER": "slurmflow",
        "REGISTRY_PASSWORD": s["REGISTRY_PASSWORD"],
        "BASE_IMAGE": BASE_IMAGE,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5001",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": s["MLFLOW_ADMIN_PASSWORD"],
        "MONGO_URI": "mongodb://127.0.0.1:27017",
        "AIRFLOW_URL": "http://127.0.0.1:8080",
        "AIRFLOW_USER": AIRFLOW_USER,
        "AIRFLOW_PASSWORD": AIRFLOW_PASSWORD,
    }


def write_stack_env() -> None:
    """Write ``.stack/stack.env`` (mode 600: it holds dev credentials)."""
    header = "# Written by `make up`: addresses and dev credentials of the local stack.\n"
    _write_private(STACK / "stack.env", header + "".join(f"{k}={v}\n" for k, v in stack_env().items()))


def code_version() -> str:
    """Hash of the Python code Airflow components import once at start (plugins, training).

    It is part of their environment, so `make up` sees a changed configuration after an edit and
    restarts exactly those programs: tests never run against stale plugin code.
    """
    digest = hashlib.sha256()
    for root in (REPO / "plugins", REPO / "training" / "src"):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def celery_broker_url() -> str:
    """The stack's Redis as Celery broker, password included: environment only, never argv."""
    return f"redis://:{load_secrets()['REDIS_PASSWORD']}@127.0.0.1:{REDIS_PORT}/0"


#: Modules the LocalExecutor's workers import before they fork task processes (see airflow_env):
#: the heavy third-party ones only. Our own (slurmflow.*, the DAG files) are imported by each task
#: from disk, so an edited plugin or DAG takes effect in the next task, as without a preload: a
#: preloaded copy would stay the old one until the scheduler restarts.
TASK_PRELOAD = (
    "airflow", "airflow.executors.local_executor", "airflow.sdk.execution_time.task_runner",
    "airflow.providers.ssh.hooks.ssh", "airflow.providers.standard.decorators.python",
    "paramiko", "pymongo", "mlflow", "mlflow.tracking", "jinja2",
)


def airflow_env(executor: str | None = None) -> dict[str, str]:
    """Environment shared by every Airflow component (api-server, scheduler, ...).

    :param executor: a key of :data:`EXECUTORS`; by default the stack's (:func:`stack_executor`).
    """
    s = load_secrets()
    db = f"postgresql+psycopg2://airflow:{s['PG_AIRFLOW_PASSWORD']}@127.0.0.1:{PG_PORT}/airflow"
    executor = executor or stack_executor()
    env = {
        "AIRFLOW_HOME": str(STACK / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        # The product's dags/ (Airflow's default bundle), plus the DAGs only the e2e tests run
        # (tests/e2e/dags: e.g. a job that prints its secrets), kept out of the product's folder.
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([
            {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {}},
            {"name": "e2e-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(REPO / "tests" / "e2e" / "dags")}},
        ]),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor],
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:8080/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(STACK / "airflow" / "passwords.json"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": "8080",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": s["AIRFLOW_API_SECRET_KEY"],
        "AIRFLOW__API_AUTH__JWT_SECRET": s["AIRFLOW_JWT_SECRET"],
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(STACK / "airflow" / "logs"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        # A task whose process died runs again (and re-attaches to its Slurm job) within about a
        # minute instead of five. Two rules cover it: a dead task under a live scheduler fails
        # 30 s after its last heartbeat (default 300 s; supervisors beat every 5 s); a task that
        # died WITH its scheduler (LocalExecutor) belongs to the dead scheduler job, which only
        # the orphan check resets - every 10 s here instead of 300 s, once that job has missed
        # scheduler_health_check_threshold (30 s). Real sites: see README, Troubleshooting.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
        # An idle scheduler loop sleeps this long before it looks again: each task handover (a task
        # ended, the next is queued; a trigger fired, the task resumes) waited half of it on
        # average, ~0.5 s per task in a 7-task run at the default 1 s.
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        # Task processes fork from the LocalExecutor's workers; a forkserver starts those with what
        # every task imports already imported (MLflow, the SSH stack, pymongo, our steps), so a task
        # no longer spends seconds importing them (bench/dag_timings.py). Airflow 3.3's own settings.
        "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
        "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD": ",".join(TASK_PRELOAD),
        # Slurm, MLflow and Mongo clients in tasks use the stack's addresses.
        "SLURM_CONF": str(SLURM_CONF),
        "PYTHONPATH": f"{REPO / 'plugins'}:{REPO}",
        # Every task is a new Python process: with PYTHONDONTWRITEBYTECODE inherited (some shells and
        # CI set it) each one compiled our DAGs and plugins from source again. The venv itself is
        # compiled at install (uv --compile-bytecode).
        "PYTHONDONTWRITEBYTECODE": "",
        "SLURMFLOW_CODE_VERSION": code_version(),
    }
    if executor == "celery":
        # Like the metadata DB's, these passwords reach the programs only through the environment.
        env["AIRFLOW__CELERY__BROKER_URL"] = celery_broker_url()
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = f"db+{db}"  # Celery's SQL result backend, same DB
        # A Celery task is one task attempt up to its deferral (waits give the slot back): far less
        # than a day. Said explicitly, or the provider warns in every component's log.
        env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"] = "86400"
    return env
