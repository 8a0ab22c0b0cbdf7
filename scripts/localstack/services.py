"""The services of the local stack: how each starts, which port it owns, how to tell it is healthy.

Each service is one supervisord program, so any single one can be stopped, killed or restarted
on its own (``supervisorctl -c .stack/supervisord.conf restart slurmd``). They start in waves:
a wave starts only when every service of the previous waves passed its health check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..airflow_api import AirflowAPI, AirflowAPIError
from . import nodes
from .config import (
    AIRFLOW_PASSWORD,
    AIRFLOW_USER,
    CLUSTER_USER,
    PG_PORT,
    REDIS_PORT,
    REPO,
    SLURM_CONF,
    SSH_KEY,
    STACK,
    TEMPLATES,
    VENV_BIN,
    airflow_env,
    celery_broker_url,
    load_secrets,
    stack_executor,
)
from .rpc import running_supervisor

PG_BIN = "/usr/lib/postgresql/15/bin"
SLURM_ENV = {"SLURM_CONF": str(SLURM_CONF)}
# Slurm clients only look for munge at its default socket (AuthInfo is not honoured everywhere).
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def slurm_daemon_env() -> dict[str, str]:
    """The environment of slurmctld and slurmd: ``SLURM_CONF`` and the hash of its template.

    The hash makes a changed ``include/stack/slurm.conf`` a changed program configuration, so
    ``make up`` restarts both daemons (partitions, PreemptType and AuthInfo need a restart, not
    only ``scontrol reconfigure``). Running jobs survive: their slurmstepd are not children of slurmd.
    """
    return {**SLURM_ENV, "SLURMFLOW_SLURM_CONF_VERSION": template_version("slurm.conf")}


def template_version(name: str) -> str:
    """Hash of a config template in ``include/stack``: in a program's environment, it makes an
    edit of the template a changed program configuration, which ``make up`` restarts."""
    return hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Service:
    """One supervised daemon.

    :param name: supervisord program name.
    :param command: argv of the foreground daemon.
    :param wave: start order; all services of one wave start together.
    :param port: the TCP port it owns on 127.0.0.1 (checked before start), if any.
    :param health: returns None when healthy, else a short reason.
    :param user: Unix user to run as (supervisord drops privileges).
    :param env: extra environment.
    """

    name: str
    command: list[str]
    wave: int
    health: Callable[[], str | None]
    port: int | None = None
    user: str = "root"
    env: dict[str, str] = field(default_factory=dict)
    stopsignal: str = "TERM"

    @property
    def log(self):
        return STACK / "logs" / f"{self.name}.log"


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 10,
         expect: str | None = None) -> str | None:
    """Run a probe command; None when it exits 0 (and prints ``expect``, if given), else the last
    line of its output."""
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if out.returncode == 0 and (expect is None or out.stdout.strip() == expect):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {out.returncode}"


def _http(url: str, ok: tuple[int, ...] = (200,), auth: tuple[str, str] | None = None) -> str | None:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            code = resp.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except OSError as exc:
        return f"{url}: {exc}"
    return None if code in ok else f"{url}: HTTP {code}"


def _tcp(port: int) -> str | None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        return f"127.0.0.1:{port}: {exc.strerror or exc}"
    return None


def _slurmd_health(node: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-n", node, "-o", "%T"],
                capture_output=True, text=True, timeout=10, env={**os.environ, **SLURM_ENV},
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        return None if out.rstrip("*") in {"idle", "mixed", "allocated", "completing"} else f"node {node} is {out!r}"

    return check


def _ssh_health() -> str | None:
    # A real login as the pipeline does it (key-only, the cluster user), not just an open port.
    return _run([
        "ssh", "-i", str(SSH_KEY), "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{CLUSTER_USER}@127.0.0.1", "true",
    ])


def _airflow_component(component: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/api/v2/monitor/health", timeout=5) as r:
                health = json.load(r)
        except OSError as exc:
            return f"api-server: {exc}"
        status = (health.get(component) or {}).get("status")
        return None if status == "healthy" else f"{component} is {status or 'not reporting'}"

    return check


def heartbeat_shortfall(process_starts: Iterable[float], job_starts: Iterable[float]) -> int:
    """How many processes lack a live job of their own, a job counting for a process only when it
    started after it (a killed process's job stays "alive" until its heartbeat is too old).

    Newer processes can use fewer jobs than older ones, so counting, newest first, the processes
    against the jobs started after each is enough (Hall's condition for nested sets).
    """
    jobs = list(job_starts)
    short = 0
    for k, start in enumerate(sorted(process_starts, reverse=True), 1):
        short = max(short, k - sum(j >= start for j in jobs))
    return short


def _triggerers(names: tuple[str, ...]) -> Callable[[], str | None]:
    """Every running triggerer of ``names`` heartbeats: ``/monitor/health`` only tells the newest
    heartbeat of any triggerer, so with two each needs an alive TriggererJob of its own."""
    def check() -> str | None:
        sup = running_supervisor()
        starts = [p["start"] for p in (sup.getAllProcessInfo() if sup else [])
                  if p["name"] in names and p["statename"] == "RUNNING"]
        try:
            api = AirflowAPI("http://127.0.0.1:8080", AIRFLOW_USER, AIRFLOW_PASSWORD)
            jobs = api.get("/jobs?job_type=TriggererJob&job_state=running&is_alive=true&limit=100")["jobs"]
        except (OSError, AirflowAPIError) as exc:
            return f"api-server: {exc}"
        short = heartbeat_shortfall(starts, (datetime.fromisoformat(j["start_date"]).timestamp() for j in jobs))
        return f"{short} of {len(starts)} triggerers without a live heartbeat of their own" if short else None

    return check


def _celery_worker(node: str) -> Callable[[], str | None]:
    """A broadcast ping through the broker that the worker ``node`` answers: the broker is up,
    takes the password, and that worker consumes from it."""
    def check() -> str | None:
        from celery import Celery

        app = Celery(set_as_current=False, broker=celery_broker_url(), broker_connection_retry=False,
                     broker_transport_options={"max_retries": 0})
        try:
            replies = app.control.ping(destination=[node], timeout=2)
        except Exception as exc:  # the broker down or refusing: its reason, never the URL
            return f"broker 127.0.0.1:{REDIS_PORT}: {type(exc).__name__}: {exc}"
        finally:
            app.close()
        return None if any(node in reply for reply in replies) else f"{node} did not answer a ping"

    return check


def _airflow(*args: str) -> list[str]:
    return [str(VENV_BIN / "airflow"), *args]


WORKER_CONCURRENCY = 4  # task slots per Celery worker: two workers give [core] parallelism (8)
TRIGGERERS = ("airflow-triggerer", "airflow-triggerer-2")  # with the CeleryExecutor; one with local


def celery_services(s: dict[str, str], af_env: dict[str, str]) -> list[Service]:
    """What ``make up EXECUTOR=celery`` adds: Redis as broker, two Celery workers, a second triggerer.

    All on this machine, so one log server each for tasks (8793, worker 1) and triggers (8794,
    triggerer 1) serves the one log folder; the second of each skips its own (the port is taken).
    """
    host = socket.gethostname()
    workers = [
        Service(f"airflow-worker-{i}",
                _airflow("celery", "worker", "--celery-hostname", f"worker-{i}@{host}",
                         "--concurrency", str(WORKER_CONCURRENCY), *(["--skip-serve-logs"] if i > 1 else [])),
                wave=5, env=af_env, health=_celery_worker(f"worker-{i}@{host}"))
        for i in (1, 2)
    ]
    return [
        Service("redis", ["/usr/bin/redis-server", str(STACK / "redis" / "redis.conf")], wave=1, port=REDIS_PORT,
                user="redis", env={"SLURMFLOW_REDIS_CONF_VERSION": template_version("redis.conf")},
                # The password through the environment (REDISCLI_AUTH), not -a: argv is world-readable.
                health=lambda: _run(["redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT), "ping"],
                                    {"REDISCLI_AUTH": s["REDIS_PASSWORD"]}, expect="PONG")),
        *workers,
        Service("airflow-triggerer-2", _airflow("triggerer", "--skip-serve-logs"), wave=5, env=af_env,
                health=_triggerers(TRIGGERERS)),
    ]


def services(executor: str | None = None) -> list[Service]:
    """The whole local stack, in start order.

    :param executor: ``local`` or ``celery`` (config.EXECUTORS); by default the stack's own
        (the last ``make up``'s).
    """
    executor = executor or stack_executor()
    s = load_secrets()
    reg_auth = ("slurmflow", s["REGISTRY_PASSWORD"])
    mlflow_db = f"postgresql+psycopg2://mlflow:{s['PG_MLFLOW_PASSWORD']}@127.0.0.1:{PG_PORT}/mlflow"
    af_env = airflow_env(executor)
    munge_sock = ["--socket", str(MUNGE_SOCKET)]
    stack = [
        Service("postgres", [f"{PG_BIN}/postgres", "-D", str(STACK / "pg" / "data"), "-p", str(PG_PORT),
                             "-c", "listen_addresses=127.0.0.1", "-k", str(STACK / "run" / "pg")],
                wave=1, port=PG_PORT, user="postgres", stopsignal="INT",
                health=lambda: _run([f"{PG_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(PG_PORT)])),
        Service("mariadb", ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={STACK / 'mariadb'}",
                            f"--socket={STACK / 'run' / 'mysqld.sock'}", "--port=3306",
                            "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
                            "--innodb-buffer-pool-size=64M", "--performance-schema=OFF"],
                wave=1, port=3306,
                health=lambda: _run(["mariadb-admin", f"--socket={STACK / 'run' / 'mysqld.sock'}", "ping"])),
        Service("munged", ["/usr/sbin/munged", "-F", *munge_sock, f"--key-file={STACK / 'munge' / 'munge.key'}",
                           f"--seed-file={STACK / 'munge' / 'munged.seed'}",
                           "--pid-file=/run/munge/munged.pid",
                           f"--log-file={STACK / 'logs' / 'munged.daemon.log'}"],
                wave=1, user="munge",
                health=lambda: _run(["sh", "-c", f"munge -n {shlex.join(munge_sock)} | unmunge {shlex.join(munge_sock)}"])),
        Service("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(STACK / "sshd" / "sshd_config")],
                wave=1, port=2222, health=_ssh_health),
        Service("dockerd", ["/usr/sbin/dockerd", f"--data-root={STACK / 'docker'}",
                            f"--exec-root={STACK / 'run' / 'docker'}", f"--pidfile={STACK / 'run' / 'dockerd.pid'}",
                            "--host=unix:///var/run/docker.sock", "--group=docker"],
                wave=1, health=lambda: _run(["docker", "version", "--format", "{{.Server.Version}}"])),
        Service("registry", ["/usr/bin/docker-registry", "serve", str(STACK / "registry" / "config.yml")],
                wave=1, port=5000, health=lambda: _http("http://127.0.0.1:5000/v2/", auth=reg_auth)),
        Service("mongo", [str(VENV_BIN / "nx-27017"), "--host", "127.0.0.1", "--port", "27017",
                          "--data-dir", str(STACK / "mongo"), "--log-file", str(STACK / "logs" / "mongo.daemon.log"),
                          "--pid-file", str(STACK / "run" / "mongo.pid")],
                wave=1, port=27017, health=lambda: _tcp(27017)),
        Service("slurmdbd", ["/usr/sbin/slurmdbd", "-D"], wave=2, port=6819, env=SLURM_ENV,
                health=lambda: _run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], SLURM_ENV)),
        Service("mlflow", [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth",
                           "--artifacts-destination", str(STACK / "mlflow" / "artifacts"),
                           "--host", "127.0.0.1", "--port", "5001", "--workers", "1"],
                wave=2, port=5001,
                # The DB password goes through the environment: argv is world-readable in ps.
                env={"MLFLOW_BACKEND_STORE_URI": mlflow_db,
                     "MLFLOW_AUTH_CONFIG_PATH": str(STACK / "mlflow" / "auth.ini"),
                     "MLFLOW_FLASK_SERVER_SECRET_KEY": s["MLFLOW_FLASK_SECRET_KEY"],
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                     "SLURMFLOW_MLFLOW_AUTH_VERSION": template_version("mlflow_auth.ini")},
                health=lambda: _http("http://127.0.0.1:5001/health")),
        Service("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"], wave=3, port=6817, env=slurm_daemon_env(),
                health=lambda: _run(["scontrol", "ping"], SLURM_ENV)),
        Service("slurmd", nodes.slurmd_command("local1"), wave=4, port=6818, env=slurm_daemon_env(),
                health=_slurmd_health("local1")),
        # the second node's slurmd owns port 6818 in its own network namespace (nodes.py)
        Service("slurmd-local2", nodes.slurmd_command("local2"), wave=4, env=slurm_daemon_env(),
                health=_slurmd_health("local2")),
        Service("airflow-api-server", _airflow("api-server"), wave=4, port=8080, env=af_env,
                health=lambda: _http("http://127.0.0.1:8080/api/v2/monitor/health")),
        Service("airflow-scheduler", _airflow("scheduler"), wave=5, env=af_env,
                health=_airflow_component("scheduler")),
        Service("airflow-dag-processor", _airflow("dag-processor"), wave=5, env=af_env,
                health=_airflow_component("dag_processor")),
        Service("airflow-triggerer", _airflow("triggerer"), wave=5, env=af_env,
                health=_triggerers(TRIGGERERS) if executor == "celery" else _airflow_component("triggerer")),
    ]
    if executor == "celery":
        stack = sorted(stack + celery_services(s, af_env), key=lambda svc: svc.wave)  # stable sort
    return stack


def supervisord_conf(svcs: list[Service]) -> str:
    """The supervisord configuration: every service, none started automatically.

    ``make up`` starts them wave by wave so that it can stop at the first unhealthy one.
    """
    run = STACK / "run"
    lines = [
        "; Written by `make up` (scripts/localstack); edits are overwritten.",
        "[unix_http_server]", f"file={run / 'supervisor.sock'}", "chmod=0700", "",
        "[supervisord]", f"logfile={STACK / 'logs' / 'supervisord.log'}", f"pidfile={run / 'supervisord.pid'}",
        f"directory={REPO}", "nodaemon=false", "minfds=4096", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{run / 'supervisor.sock'}", "",
    ]
    for svc in svcs:
        # supervisord splits KEY="v" pairs with a non-POSIX shlex (no escapes): a value holding
        # double quotes (a JSON setting) is single-quoted instead.
        env = ",".join(f"{k}='{v}'" if '"' in v else f'{k}="{v}"' for k, v in svc.env.items())
        lines += [
            f"[program:{svc.name}]",
            f"command={shlex.join(svc.command)}",
            f"user={svc.user}",
            "autostart=false",
            "autorestart=unexpected",
            "startsecs=2",
            "stopwaitsecs=30",
            f"stopsignal={svc.stopsignal}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={svc.log}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=1",
        ]
        if env:
            lines.append(f"environment={env}")
        lines.append("")
    return "\n".join(lines)
