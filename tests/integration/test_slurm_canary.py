"""Hostile values never execute: a real job whose environment, secrets and paths carry shell
metacharacters, with canary files that must not appear; hostile names and options are rejected."""

from __future__ import annotations

import os
import shlex
import uuid

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from tests.integration import test_slurm_fixtures as live
from tests.integration.test_slurm_fixtures import (
    LiveTI,
    RecordingLog,
    make_operator,
    new_run_id,
    run_to_completion,
    ssh,
)

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn  # the fixture, shared by the Slurm integration modules


def payloads(canary: str) -> dict[str, str]:
    return {
        "SUBST": f"$(touch {canary}.subst)",
        "BACKTICK": f"`touch {canary}.backtick`",
        "SEMI": f"x; touch {canary}.semi",
        "PIPE": f"x | touch {canary}.pipe",
        "AND": f"x && touch {canary}.and",
        "REDIR": f"x > {canary}.redir < /dev/null",
        "NEWLINE": f"x\ntouch {canary}.newline",
        "QUOTES": f"it's \"{canary}\" '$(touch {canary}.quote)'",
    }


def canaries_left(stack_env, canary: str) -> list[str]:
    out = ssh(stack_env, f"ls -d {canary}* 2>/dev/null || true")
    local = [p for p in os.listdir(os.path.dirname(canary)) if p.startswith(os.path.basename(canary))]
    return out.stdout.split() + local


def test_hostile_values_stay_data(slurm_conn, stack_env):
    canary = f"/tmp/slurmflow-canary-{uuid.uuid4().hex[:8]}"
    env = payloads(canary)
    secret = {"SECRET_" + k: v for k, v in env.items()}
    show = "; ".join(f'printf "%s=[%s]\\n" {k} "${k}"' for k in [*env, *secret])
    op = make_operator(
        slurm_conn,
            task_id="canary",
        command=show,
        environment=env,
        secret_environment=secret,
        # A log directory and file name full of metacharacters: quoted in #SBATCH and in every
        # command that reads the log.
        sbatch_options={"output": f"logs $(touch {canary}.dir);|&/out `touch {canary}.file` %j.log"},
    )
    log = RecordingLog()
    result, _ = run_to_completion(op, LiveTI("it_canary", new_run_id(), "canary"), log)
    log_lines = log.lines
    assert result["state"] == "COMPLETED"
    assert "$(touch" in result["log_path"] and "`touch" in result["log_path"]
    assert result["log_path"].endswith(f" {result['job_id']}.log")
    text = "\n".join(log_lines)
    for name, value in [*env.items(), *secret.items()]:
        first = value.split("\n")[0]
        assert f"{name}=[{first}" in text, f"{name} printed literally"
    assert canaries_left(stack_env, canary) == []
    # The secret values never appear in the script on the cluster.
    script = ssh(stack_env, f"cat {shlex.quote(result['script_path'])}").stdout
    assert "export SECRET_" not in script and f"export SUBST='$(touch {canary}.subst)'" in script


@pytest.mark.parametrize(
    "options",
    [
        {"job_name": "x$(touch /tmp/slurmflow-canary-jobname)"},
        {"partition": "debug; touch /tmp/slurmflow-canary-partition"},
        {"account": "research`touch /tmp/slurmflow-canary-account`"},
        {"output": "/tmp/x\ntouch /tmp/slurmflow-canary-newline"},
        {"array": "0-1%1 --wrap='touch /tmp/slurmflow-canary-array'"},
    ],
)
def test_hostile_names_and_options_are_rejected_before_any_ssh(slurm_conn, stack_env, options):
    op = make_operator(slurm_conn, task_id="hostile", command="true", sbatch_options=options)
    with pytest.raises(AirflowFailException, match="invalid|set by slurmflow"):
        run_to_completion(op, LiveTI("it_canary", new_run_id(), "hostile"))
    assert ssh(stack_env, "ls /tmp | grep -c slurmflow-canary- || true").stdout.strip() == "0"


def test_hostile_environment_names_are_rejected(slurm_conn):
    op = make_operator(slurm_conn, task_id="hostile_env", command="true",
                       environment={"X=1; touch /tmp/slurmflow-canary-envname; Y": "v"})
    with pytest.raises(AirflowFailException, match="variable name"):
        run_to_completion(op, LiveTI("it_canary", new_run_id(), "hostile_env"))
