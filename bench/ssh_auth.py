"""Logins on the login node per 100 tasks: paramiko (today's default) vs the OpenSSH transport.

Each "task" is what a train task does over SSH, on a fresh :class:`SlurmHook` (tasks are fresh
processes): look its key up in squeue, make its job directory, stage a mode-600 secrets file
and the script, read them back, close. Then one poller round (the triggerer's asyncssh or
OpenSSH side). Logins are counted in the sshd's own log (``Accepted <method> for``), on this
benchmark's own sshd servers (tests/integration/sshd_servers.py), never the stack's:

- paramiko on a key-only node: one login per hook, i.e. per task, plus one per poller connection;
- openssh, auto mode, same node: Airflow logs in once and every later task rides the master;
- openssh, reuse-only, on a node demanding key + password behind a bastion: the one login is
  the person's (after MFA); Airflow's own logins are zero.

Needs root (sshd, a throwaway user). Uses the stack's Slurm when `make up` ran (real squeue),
else only the shell. Prints the figures and writes bench/results/ssh_auth.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO))

TASKS = 100


def _slurm_conf() -> str | None:
    stack = Path(os.environ.get("SLURMFLOW_STACK_DIR", REPO / ".stack"))
    env = stack / "stack.env"
    if not env.exists():
        return None
    values = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line and line[0] != "#")
    return values.get("SLURM_CONF")


def _connect(conn_id: str, port: int, user: str, **extra) -> None:
    conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": port, "login": user,
            "extra": {"no_host_key_check": True, "conn_timeout": 10, **extra}}
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)


def _task(conn_id: str, root: str, index: int, query: list[str]) -> int:
    from slurmflow.hooks.slurm import SlurmHook

    hook = SlurmHook(conn_id, job_root=root)
    hook.run(query)
    job_dir = f"{root}/{conn_id}/t{index}"
    hook.make_dirs([job_dir])
    hook.upload(f"{job_dir}/.secrets.env", "TOKEN=x\n", mode=0o600)
    hook.upload(f"{job_dir}/job.sbatch", "#!/bin/bash\ntrue\n", mode=0o700)
    hook.check(["cat", f"{job_dir}/.secrets.env", f"{job_dir}/job.sbatch"])
    hook.close()
    return 5  # remote commands (or SFTP sessions) this task ran


async def _poll(conn_id: str, query: list[str], rounds: int = 5) -> None:
    from slurmflow.hooks.slurm import SlurmAsyncHook

    hook = SlurmAsyncHook(conn_id)
    for _ in range(rounds):
        await hook.run(query)
    await hook.close()


def measure(name: str, conn_id: str, server, root: str, query: list[str]) -> dict:
    before = server.logins()
    started = time.monotonic()
    commands = sum(_task(conn_id, root, i, query) for i in range(TASKS))
    task_seconds = time.monotonic() - started
    after_tasks = server.logins()
    asyncio.run(_poll(conn_id, query))
    row = {
        "transport": name,
        "tasks": TASKS,
        "remote_commands": commands,
        "logins_per_100_tasks": round((after_tasks - before) * 100 / TASKS, 1),
        "logins_per_100_commands": round((after_tasks - before) * 100 / commands, 1),
        "poller_logins_for_5_rounds": server.logins() - after_tasks,
        "ms_per_task": round(task_seconds * 1000 / TASKS, 1),
    }
    print(f"{name:>34}: {row['logins_per_100_tasks']:6.1f} logins/100 tasks, "
          f"{row['logins_per_100_commands']:5.1f}/100 commands, poller {row['poller_logins_for_5_rounds']}, "
          f"{row['ms_per_task']:6.1f} ms/task")
    return row


def main() -> None:
    from slurmflow.errors import SSHReauthRequired
    from slurmflow.hooks.slurm import SlurmHook
    from slurmflow.openssh import OpenSSHSettings, check_argv
    from tests.integration import sshd_servers

    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    if reason := sshd_servers.usable():
        sys.exit(f"ssh_auth benchmark: {reason}")
    slurm_conf = _slurm_conf()
    query = ["squeue", "--me", "--noheader"] if slurm_conf else ["true"]
    site = sshd_servers.Site.create(slurm_conf=slurm_conf)
    masters: list[OpenSSHSettings] = []
    try:
        plain = site.sshd("login-key", "AuthenticationMethods publickey")
        mfa, bastion = site.two_factor_login(), site.bastion()
        root = str(site.root / "home" / "jobs")
        key = str(site.key)
        _connect("bench_paramiko", plain.port, site.user, key_file=key)
        _connect("bench_openssh", plain.port, site.user, key_file=key, transport="openssh",
                 control_path=str(site.root / "cm-auto-%C"))
        _connect("bench_mfa", mfa.port, site.user, key_file=key, transport="openssh", reuse_only=True,
                 proxy_jump=f"127.0.0.1:{bastion.port}", control_path=str(site.root / "cm-mfa-%C"))
        for conn_id in ("bench_openssh", "bench_mfa"):
            conn = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
            masters.append(OpenSSHSettings.from_connection("127.0.0.1", conn["port"], site.user, conn["extra"]))

        rows = [measure("paramiko (default)", "bench_paramiko", plain, root, query),
                measure("openssh, Airflow logs in", "bench_openssh", plain, root, query)]
        # The person's MFA login, with the command the first failing task printed.
        try:
            SlurmHook("bench_mfa").run(["true"])
        except SSHReauthRequired as exc:
            with open(site.root / "master.err", "wb") as err:
                subprocess.run(shlex.split(exc.command), env=site.askpass_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, timeout=60, check=True)
        person = mfa.logins()
        row = measure("openssh reuse-only (MFA + bastion)", "bench_mfa", mfa, root, query)
        row.update(person_logins=person, bastion_logins=bastion.logins())
        rows.append(row)
        print(f"{'':>34}  the person's MFA login: {person} on the login node, {bastion.logins()} on the bastion")
    finally:
        for settings in masters:
            argv = check_argv(settings)
            argv[argv.index("check")] = "exit"
            subprocess.run(argv, capture_output=True, timeout=15)
        site.close()

    result = {"benchmark": "ssh_auth", "query": " ".join(query), "rows": rows,
              "note": "logins counted in sshd's log (Accepted <method> for); a task = fresh SlurmHook: "
                      "squeue, mkdir, 2 uploads, cat"}
    out = REPO / "bench" / "results" / "ssh_auth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
