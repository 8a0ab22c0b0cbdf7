"""train_model over the OpenSSH transport, reuse-only: the login a person made carries the whole run.

The cluster is the stack's own login node behind a second connection whose extra says
``{"transport": "openssh", "reuse_only": true}`` (README, "Sites with MFA"). Without a master the
run stops at preflight with the command to open one and nothing is submitted; after that command
(the one login, what a person does after MFA) a full run (preflight, image, submit, the deferred
wait in the triggerer's poller, register, catalog) makes no further login: the login node's sshd
log counts them. The real two-factor server and the bastion are in
tests/integration/test_openssh_transport.py; here the point is the DAG's tasks and the triggerer.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

from scripts.airflow_api import AirflowAPIError
from scripts.localstack.config import STACK
from slurmflow.openssh import OpenSSHSettings, check_argv

pytestmark = pytest.mark.e2e

CLUSTER = "e2e_openssh"
SSHD_LOG = STACK / "logs" / "sshd.log"


def logins() -> int:
    return SSHD_LOG.read_text(errors="replace").count("Accepted publickey for ")


def _delete(api, path: str) -> None:
    try:
        api.delete(path)
    except AirflowAPIError as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def openssh_cluster(api, stack_env):
    control = Path(STACK) / "run" / "openssh"
    control.mkdir(parents=True, exist_ok=True)
    extra = {"transport": "openssh", "reuse_only": True, "key_file": stack_env["SSH_KEY"],
             "no_host_key_check": True, "control_path": str(control / "cm-%C")}
    _delete(api, f"/connections/{CLUSTER}")
    api.post("/connections", {"connection_id": CLUSTER, "conn_type": "ssh", "host": stack_env["SSH_HOST"],
                              "port": int(stack_env["SSH_PORT"]), "login": stack_env["SSH_USER"],
                              "extra": json.dumps(extra)})
    settings = OpenSSHSettings.from_connection(stack_env["SSH_HOST"], int(stack_env["SSH_PORT"]),
                                               stack_env["SSH_USER"], extra)
    yield settings
    argv = check_argv(settings)
    argv[argv.index("check")] = "exit"
    subprocess.run(argv, capture_output=True, timeout=15)
    _delete(api, f"/connections/{CLUSTER}")


def test_a_reuse_only_cluster_runs_a_whole_training_on_one_login(run_dag, api, openssh_cluster):
    conf = {"max_epochs": 1, "cluster": CLUSTER}
    assert subprocess.run(check_argv(openssh_cluster), capture_output=True, timeout=15).returncode != 0

    # No master: preflight fails at once, naming the command; nothing logged in, nothing queued.
    before = logins()
    run, states = run_dag("train_model", {**conf, "model_name": f"e2e-openssh-{uuid.uuid4().hex[:6]}"})
    assert run["state"] == "failed" and states["preflight"] == "failed", states
    log = api.task_log("train_model", run["dag_run_id"], "preflight")
    command = next(line.split("runs as): ", 1)[1].strip().strip('"')
                   for line in log.splitlines() if " -M -S " in line and "runs as): " in line)
    assert logins() == before

    # The person's one login (here a key; at a real site key + OTP), then the whole run rides on it.
    subprocess.run(shlex.split(command), stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
    assert logins() == before + 1
    run, states = run_dag("train_model", {**conf, "model_name": f"e2e-openssh-{uuid.uuid4().hex[:6]}"})
    assert run["state"] == "success", states
    assert logins() == before + 1, "a task or the poller logged in again instead of riding on the master"
    train_log = api.task_log("train_model", run["dag_run_id"], "train")
    assert "training complete" in train_log  # the job's lines came through the triggerer's poller
    print(f"\nopenssh e2e: 1 login for the whole run ({len(states)} tasks, poller included)")
