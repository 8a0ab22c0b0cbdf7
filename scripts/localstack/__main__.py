"""``python -m scripts.localstack up|down|status``: the local HPC site + Airflow, supervised.

``up`` is idempotent: it provisions what is missing, starts what is not running, wave by wave,
and stops at the first service that fails its health check, showing the tail of its log and
stopping everything it started, so nothing is left half-started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from . import nodes, provision
from .config import (
    CLUSTER_USER,
    EXECUTORS,
    STACK,
    VENV_BIN,
    remember_executor,
    stack_executor,
    write_stack_env,
)
from .rpc import SUPERVISOR_SOCK, supervisor  # noqa: F401  (supervisor: the chaos and e2e tools import it here)
from .rpc import running_supervisor as _running_supervisor
from .services import SLURM_ENV, Service, services, supervisord_conf

CONF = STACK / "supervisord.conf"
HEALTH_TIMEOUT = {"airflow-api-server": 180, "airflow-scheduler": 120, "airflow-dag-processor": 120,
                  "airflow-triggerer": 120, "airflow-triggerer-2": 120, "airflow-worker-1": 120,
                  "airflow-worker-2": 120, "mlflow": 120, "slurmd": 90, "slurmd-local2": 90}


def _states(sup) -> dict[str, dict]:
    return {p["name"]: p for p in sup.getAllProcessInfo()} if sup else {}


def _port_owner(port: int) -> str | None:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
    if not out:
        return None
    return out.split("users:")[-1] if "users:" in out else "another process"


def _log_tail(svc: Service, lines: int = 25) -> str:
    if not svc.log.exists():
        return "(no log yet)"
    return "\n".join(svc.log.read_text(errors="replace").splitlines()[-lines:])


def preflight(svcs: list[Service]) -> None:
    """Fail before starting anything on a missing program or a port held by someone else."""
    missing = [s.command[0] for s in svcs if not shutil.which(s.command[0])]
    missing += [t for t in ("ssh", "docker", "sbatch", "sacctmgr", "psql", "mariadb", "htpasswd", "debootstrap")
                if not shutil.which(t)]
    if missing:
        sys.exit(f"missing dependencies: {', '.join(sorted(set(missing)))}\n"
                 "  run `make deps` (scripts/install_system.sh and the .venv) first")
    states = _states(_running_supervisor())
    for s in svcs:
        if s.port and states.get(s.name, {}).get("statename") != "RUNNING":
            owner = _port_owner(s.port)
            if owner:
                sys.exit(f"port {s.port} is already in use ({owner}); the {s.name} service needs it.\n"
                         "  stop that process, or `make down` if it is a leftover of this stack")


def wait_healthy(sup, svc: Service) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT.get(svc.name, 60)
    reason = "not checked"
    while time.monotonic() < deadline:
        state = sup.getProcessInfo(svc.name)["statename"]
        if state in {"FATAL", "EXITED", "BACKOFF", "STOPPED"}:
            reason = f"process {state.lower()}"
            break
        reason = svc.health()
        if reason is None:
            return
        time.sleep(1)
    print(f"\nFAILED: {svc.name} did not become healthy: {reason}\n--- last lines of {svc.log} ---\n"
          f"{_log_tail(svc)}\n---", file=sys.stderr)
    sys.exit(1)


def start_wave(sup, svcs: list[Service], wave: int) -> None:
    batch = [s for s in svcs if s.wave == wave]
    states = _states(sup)
    for s in batch:
        if states[s.name]["statename"] != "RUNNING":
            sup.startProcess(s.name, False)
    for s in batch:
        wait_healthy(sup, s)
    print(f"  wave {wave} healthy: {', '.join(s.name for s in batch)}")


def up(executor: str = "local") -> None:
    """Start the stack with ``executor`` (a key of ``EXECUTORS``); programs only another
    executor has are stopped and removed (``update_programs``)."""
    t0 = time.monotonic()
    svcs = services(executor)
    preflight(svcs)
    remember_executor(executor)  # from here on the stack is this executor's, whatever happens
    try:
        _provision_and_start(svcs)
    except SystemExit as exc:  # a failed health check or set-up step
        if exc.code not in (0, None):
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            print("stopping the stack so nothing is left half-started", file=sys.stderr)
            down(quiet=True)
        raise
    print(f"stack is up in {time.monotonic() - t0:.0f} s (addresses and dev credentials: {STACK / 'stack.env'})")
    status()


def _provision_and_start(svcs: list[Service]) -> None:
    provision.folders()
    nodes.network_up()  # before any Slurm daemon: the controller's address is on it
    provision.cluster_user()
    provision.keys()
    provision.configs()
    provision.init_databases()
    CONF.write_text(supervisord_conf(svcs))
    CONF.chmod(0o600)  # it holds the daemons' environment, database passwords included
    sup = _running_supervisor()
    if sup is None:
        subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(CONF)], check=True)
        for _ in range(50):
            sup = _running_supervisor()
            if sup:
                break
            time.sleep(0.2)
    else:
        update_programs(sup)
    start_wave(sup, svcs, 1)
    provision.database_users()
    start_wave(sup, svcs, 2)
    provision.slurm_accounting()
    provision.airflow_db()
    for wave in (3, 4, 5):
        start_wave(sup, svcs, wave)
    provision.registry_login()
    provision.base_image()
    provision.load_airflow_settings()
    provision.campaign_data()
    provision.wheelhouse()
    write_stack_env()


def update_programs(sup) -> None:
    """Like ``supervisorctl update``: supervisord re-reads its configuration file; programs whose
    configuration changed restart, programs no longer in it (another executor's) stop and go."""
    [[added, changed, removed]] = sup.reloadConfig()
    for name in changed + removed:
        sup.stopProcessGroup(name)
        sup.removeProcessGroup(name)
    for name in added + changed:
        sup.addProcessGroup(name)
    if changed:
        print(f"  configuration changed: restarting {', '.join(changed)}")
    if removed:
        print(f"  not part of this stack any more: stopped {', '.join(removed)}")


def status() -> int:
    """Print one table: each service's process state and health. Exit 1 if any is unhealthy."""
    sup = _running_supervisor()
    states = _states(sup)
    bad = 0
    print(f"executor: {EXECUTORS[stack_executor()]}")
    print(f"{'service':<22}{'process':<10}{'pid':>8}  {'port':<6} health")
    for s in services():
        st = states.get(s.name, {})
        state = st.get("statename", "DOWN")
        health = s.health() if state == "RUNNING" else "not running"
        bad += health is not None
        print(f"{s.name:<22}{state:<10}{st.get('pid') or '-':>8}  {s.port or '-':<6} {health or 'ok'}")
    return 1 if bad else 0


def _ours_left() -> list[str]:
    """Processes of this stack still alive (by their config/data paths or daemon names)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    names = ("slurmctld", "slurmd ", "slurmdbd", "slurmstepd", "munged", "dockerd", "containerd", "docker-registry",
             "nx-27017", "mariadbd")
    mine = {line.split()[0] for line in subprocess.run(["ps", "-o", "pid=", "-u", CLUSTER_USER],
                                                        capture_output=True, text=True).stdout.splitlines()}
    return [line.strip() for line in out.splitlines()
            if (str(STACK) in line or any(n in line for n in names) or line.split()[0] in mine)
            and "localstack" not in line]


def down(quiet: bool = False) -> None:
    """Cancel running jobs, stop every service and supervisord, and check nothing is left."""
    sup = _running_supervisor()
    if sup:
        if _states(sup).get("slurmctld", {}).get("statename") == "RUNNING":
            subprocess.run(["scancel", "--quiet", "--partition", "debug"], env={**os.environ, **SLURM_ENV},
                           capture_output=True)
        sup.stopAllProcesses(True)
        sup.shutdown()
        for _ in range(100):
            if not SUPERVISOR_SOCK.exists() or _running_supervisor() is None:
                break
            time.sleep(0.2)
    # slurmstepd outlives slurmd by design (jobs survive a slurmd restart), and rootless podman
    # leaves a pause process per user: on `down` the cluster user's processes go too.
    subprocess.run(["pkill", "-KILL", "-u", CLUSTER_USER], capture_output=True)
    subprocess.run(["pkill", "-f", "slurmstepd"], capture_output=True)
    time.sleep(1)
    subprocess.run(["pkill", "-KILL", "-f", "slurmstepd"], capture_output=True)  # it may ignore TERM
    # dockerd leaves its network-namespace bind mount behind, which would block `make clean`.
    for ns in (STACK / "run" / "docker" / "netns").glob("*"):
        subprocess.run(["umount", str(ns)], capture_output=True)
    nodes.network_down()
    for _ in range(50):
        left = _ours_left()
        if not left:
            break
        time.sleep(0.2)
    if not quiet:
        if left:
            print("still running after `down`:\n  " + "\n  ".join(left), file=sys.stderr)
            sys.exit(1)
        print("stack is down: no stack process left")


def main() -> None:
    parser = argparse.ArgumentParser(prog="localstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--executor", choices=list(EXECUTORS), default="local",
                        help="up: Airflow's executor (make up EXECUTOR=...); down and status act on the running one")
    args = parser.parse_args()
    cmd = args.command
    if cmd == "up":
        up(args.executor)
    elif cmd == "down":
        down()
    else:
        sys.exit(status())


if __name__ == "__main__":
    main()
