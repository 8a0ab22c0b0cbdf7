"""``hpctrain store``: the staging store of one job, started as a job step (SmartSim's Orchestrator).

``srun -n 1 --exact <runtime> python -m hpctrain store --dir "$SLURMFLOW_JOB_DIR/.staging"`` runs
Debian's ``redis-server`` inside the job's allocation, so the store lives and dies with the job
(docs/online-training-slurm.md). This wrapper

* picks a free port on the node's address (``$SLURMD_NODENAME``, which compute nodes resolve);
* writes the password (``$SLURMFLOW_STAGING_PASSWORD``, from the job's secrets file) into a mode-600
  config file, never onto a command line, and deletes that file once the server has read it;
* waits until the server answers ``PING`` with that password, at most ``--start-timeout-s``; then
  publishes ``host:port`` in ``<dir>/address`` (atomically), which the batch script exports as
  ``$SLURMFLOW_STAGING_ADDRESS`` to the producers and the trainer;
* ignores the preemption signal (it is the trainer's: the store must outlive the checkpoint) and
  ends the server without saving on SIGTERM/SIGINT (the job's end).

Exit codes: 0 the server ended on request, 1 it did not come up (the reason on stderr) or died,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets as _secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpctrain.staging import PASSWORD_ENV, StagingStore, StoreAddress, StoreUnavailable

log = logging.getLogger("hpctrain.store")

#: the file the batch script waits for: ``host:port`` of the store, once it answers
ADDRESS_FILE = "address"
_PORT_TRIES = 3


def node_host(environ: dict[str, str] | None = None) -> str:
    """The name other steps reach this node by: Slurm's node name, else the host name."""
    env = os.environ if environ is None else environ
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def free_port(address: str) -> int:
    """A port nobody listens on at ``address`` now (the server binds it a moment later; a lost
    race makes it fail to start, and :func:`serve` tries another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _quoted(value: str) -> str:
    """``value`` inside a redis.conf double-quoted string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def config_text(bind: str, port: int, password: str, data_dir: Path, max_memory: str | None) -> str:
    """redis.conf for a job-local, memory-only store: no persistence, no replication, password.

    :raises ValueError: a password with a line break (it would end the directive).
    """
    if "\n" in password or "\r" in password:
        raise ValueError("the staging password must not contain a line break")
    lines = [
        f"bind {bind}",
        f"port {port}",
        f'requirepass "{_quoted(password)}"',
        "protected-mode yes",
        'save ""',
        "appendonly no",
        f'dir "{data_dir}"',
        'logfile ""',
        "daemonize no",
    ]
    if max_memory:
        # refuse writes instead of evicting batches: producers' backpressure, never silent loss
        lines += [f"maxmemory {max_memory}", "maxmemory-policy noeviction"]
    return "\n".join(lines) + "\n"


def _start(binary: str, bind: str, port: int, password: str, data_dir: Path, max_memory: str | None,
           timeout_s: float) -> subprocess.Popen:
    conf = data_dir / f"redis-{_secrets.token_hex(4)}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(config_text(bind, port, password, data_dir, max_memory))
    try:
        # Its own session: a signal sent to the step's process group is ours to handle, not the server's.
        proc = subprocess.Popen([binary, str(conf)], start_new_session=True)
        try:
            StagingStore.connect(StoreAddress(bind, port, password), wait_s=timeout_s, poll_s=0.2,
                                 alive=lambda: proc.poll() is None)
        except StoreUnavailable:
            _stop(proc)
            raise
        return proc
    finally:
        conf.unlink(missing_ok=True)  # the server has read it (or is gone): the password leaves the disk


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    if proc.poll() is None:
        proc.terminate()  # redis-server: SIGTERM = shut down (with `save ""`: nothing written)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def serve(data_dir: Path, host: str, start_timeout_s: float, max_memory: str | None, binary: str) -> int:
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        print(f"hpctrain store: ${PASSWORD_ENV} is not set (the job's secrets file gives it)", file=sys.stderr)
        return 2
    found = shutil.which(binary)
    if found is None:
        print(f"hpctrain store: {binary} is not installed in this image: the training image's base needs "
              "Debian's redis-server (README, Online training)", file=sys.stderr)
        return 1
    bind = socket.gethostbyname(host)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / ADDRESS_FILE).unlink(missing_ok=True)
    stop = {"requested": False}

    def request_stop(signum, frame) -> None:  # noqa: ARG001
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    proc, reason = None, ""
    for _ in range(_PORT_TRIES):
        port = free_port(bind)
        try:
            proc = _start(found, bind, port, password, data_dir, max_memory, start_timeout_s)
            break
        except StoreUnavailable as exc:
            reason = str(exc)
    if proc is None:
        print(f"hpctrain store: the staging store did not come up within {start_timeout_s:g}s: {reason}",
              file=sys.stderr)
        return 1
    tmp = data_dir / f".{ADDRESS_FILE}.tmp"
    tmp.write_text(f"{host}:{port}\n", encoding="utf-8")
    tmp.replace(data_dir / ADDRESS_FILE)
    log.info("staging store up at %s:%d (%s)", host, port, bind)
    while not stop["requested"] and proc.poll() is None:
        time.sleep(0.5)
    if proc.poll() is not None:
        print(f"hpctrain store: redis-server ended on its own (exit {proc.returncode})", file=sys.stderr)
        return 1
    _stop(proc)
    log.info("staging store stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpctrain store", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, type=Path, help="the job's staging folder (mode 700): address file")
    p.add_argument("--host", help="the name the other steps reach the store by (default $SLURMD_NODENAME)")
    p.add_argument("--start-timeout-s", type=float, default=60.0,
                   help="the server must answer within this, else exit 1 with the reason (default 60)")
    p.add_argument("--max-memory", help="redis maxmemory (e.g. 2gb; default: none), with noeviction")
    p.add_argument("--redis-server", default="redis-server", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if args.start_timeout_s <= 0:
        print("hpctrain store: --start-timeout-s must be > 0", file=sys.stderr)
        return 2
    # The preemption signal is the trainer's: the store keeps serving while it checkpoints.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    return serve(args.dir, args.host or node_host(), args.start_timeout_s, args.max_memory, args.redis_server)
