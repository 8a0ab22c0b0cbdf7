"""The OpenSSH transport against real sshd servers: one MFA login carries every task and the poller.

The servers are this module's own (``sshd_servers``), not the stack's: a login node that demands
a key *and* a password (``AuthenticationMethods publickey,password``) behind a key-only bastion,
and a certificate-only login node. They serve the stack's Slurm (``SetEnv SLURM_CONF``), so the
commands are real ``squeue``/``sacct`` calls. Logins are counted in each sshd's log.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import time

import pytest

from slurmflow.errors import SSHCertificateExpired, SSHReauthRequired
from slurmflow.hooks.slurm import SlurmAsyncHook, SlurmHook
from slurmflow.openssh import OpenSSHSettings, check_argv
from slurmflow.poller import ClusterPoller, Subscription
from slurmflow.status import ResolveOptions
from tests.integration import sshd_servers

pytestmark = pytest.mark.integration

TASKS = 20


@pytest.fixture(scope="module")
def site(stack_env):
    if reason := sshd_servers.usable():
        pytest.skip(reason)
    site = sshd_servers.Site.create(slurm_conf=stack_env["SLURM_CONF"])
    yield site
    site.close()


@pytest.fixture(scope="module")
def mfa(site):
    """The two-factor login node and the bastion in front of it."""
    return site.two_factor_login(), site.bastion()


def _connect(monkeypatch, conn_id: str, port: int, login: str, **extra) -> dict:
    conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": port, "login": login,
            "extra": {"transport": "openssh", "no_host_key_check": True, "conn_timeout": 5, **extra}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn


def _settings(conn: dict) -> OpenSSHSettings:
    return OpenSSHSettings.from_connection(conn["host"], conn["port"], conn["login"], conn["extra"])


def _exit_master(settings: OpenSSHSettings) -> None:
    argv = check_argv(settings)
    argv[argv.index("check")] = "exit"
    subprocess.run(argv, capture_output=True, timeout=15)


@pytest.fixture
def mfa_conn(site, mfa, monkeypatch):
    login, bastion = mfa
    conn = _connect(monkeypatch, "slurm_mfa", login.port, site.user, key_file=str(site.key), reuse_only=True,
                    proxy_jump=f"127.0.0.1:{bastion.port}", control_path=str(site.root / "cm-%C"))
    yield conn
    _exit_master(_settings(conn))


def _open_master_as_a_person(site, command: str) -> None:
    """Run the command the error told us to run; ssh asks for the password (the second factor)
    through SSH_ASKPASS, as a person would type it. stderr to a file: the bastion hop keeps it."""
    with open(site.root / "master.err", "wb") as err:
        subprocess.run(shlex.split(command), env=site.askpass_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=err, timeout=60, check=True)


def _task(site, index: int) -> None:
    """What a task does over its own hook: query, stage a secrets file and a script, read back."""
    hook = SlurmHook("slurm_mfa", job_root=str(site.root / "home" / "jobs"))
    assert hook.check(["squeue", "--me", "--noheader"]) == ""
    job_dir = f"{hook.job_root}/t{index}"
    hook.make_dirs([job_dir])
    hook.upload(f"{job_dir}/.secrets.env", "TOKEN=s3cret\n", mode=0o600)
    hook.upload(f"{job_dir}/job.sbatch", "#!/bin/bash\necho hi\n", mode=0o700)
    modes = hook.check(["stat", "-c", "%a %n", f"{job_dir}/.secrets.env", f"{job_dir}/job.sbatch"]).split("\n")
    assert [m.split()[0] for m in modes if m] == ["600", "700"]
    local = site.root / "local" / f"t{index}"
    assert hook.download(job_dir, local)
    assert (local / ".secrets.env").read_text() == "TOKEN=s3cret\n"
    assert not hook.download(f"{job_dir}/absent", local / "absent")
    hook.close()


async def _poll_once(conn_id: str) -> tuple:
    poller = ClusterPoller(conn_id, failure_limit=1, coalesce=0.0, linger=0.0)
    sub = poller.subscribe(Subscription(job_id="999999", failure_limit=1, failure_patience=0))
    update = await asyncio.wait_for(sub.next_update(), 30)
    poller.unsubscribe(sub)
    queries = dict(poller.round_queries[0]) if poller.round_queries else {}
    await poller._close()
    return update, queries


def test_reuse_only_without_a_master_fails_at_once_with_the_command(site, mfa, mfa_conn):
    login, bastion = mfa
    before = login.connections(), bastion.connections()
    started = time.monotonic()
    with pytest.raises(SSHReauthRequired) as caught:
        SlurmHook("slurm_mfa").run(["squeue", "--me"])
    assert time.monotonic() - started < 3
    assert "ssh -M -S" in caught.value.command and "-fN" in caught.value.command
    assert caught.value.command in str(caught.value)
    assert (login.connections(), bastion.connections()) == before, "no login was even tried"


def test_one_mfa_login_carries_every_task_and_the_poller(site, mfa, mfa_conn):
    login, bastion = mfa
    with pytest.raises(SSHReauthRequired) as caught:
        SlurmHook("slurm_mfa").run(["true"])
    _open_master_as_a_person(site, caught.value.command)
    assert (login.logins(), bastion.logins()) == (1, 1)

    for index in range(TASKS):
        _task(site, index)
    update, queries = asyncio.run(_poll_once("slurm_mfa"))
    assert update.error is None and update.warning is None, update
    assert update.snapshot is not None and queries.get("squeue") == 1

    # Zero further authentications: the person's one login, on both servers.
    assert (login.logins(), bastion.logins()) == (1, 1)
    assert (login.connections(), bastion.connections()) == (1, 1)


def test_a_closed_master_fails_tasks_and_the_poller_fast(site, mfa, mfa_conn):
    login, _bastion = mfa
    with pytest.raises(SSHReauthRequired) as caught:
        SlurmHook("slurm_mfa").run(["true"])
    _open_master_as_a_person(site, caught.value.command)
    hook = SlurmHook("slurm_mfa")
    assert hook.run(["true"]).exit_code == 0
    logins = login.logins()

    _exit_master(_settings(mfa_conn))
    started = time.monotonic()
    with pytest.raises(SSHReauthRequired, match="is gone"):
        hook.run(["squeue", "--me"])
    with pytest.raises(SSHReauthRequired, match="no SSH master"):
        SlurmHook("slurm_mfa").run(["squeue", "--me"])
    update, _ = asyncio.run(_poll_once("slurm_mfa"))
    assert time.monotonic() - started < 5
    assert update.error and "ssh -M -S" in update.error and update.round == 1, "at once, not after retries"
    assert login.logins() == logins


# --- certificates, and the transport logging in by itself --------------------------------------------


@pytest.fixture(scope="module")
def cert_login(site):
    return site.cert_login()


def _cert_conn(site, cert_login, monkeypatch, name: str, validity: str, **extra) -> dict:
    cert = site.sign(validity, name)
    key = str(cert).removesuffix("-cert.pub")
    return _connect(monkeypatch, "slurm_cert", cert_login.port, site.user, key_file=key,
                    certificate_file=str(cert), control_path=str(site.root / f"cm-{name}-%C"), **extra)


def test_a_valid_certificate_logs_in_once_for_every_task(site, cert_login, monkeypatch):
    conn = _cert_conn(site, cert_login, monkeypatch, "valid", "-1m:+1h")
    try:
        before = cert_login.logins()
        hooks = [SlurmHook("slurm_cert") for _ in range(TASKS)]
        assert all(h.check(["printenv", "SLURM_CONF"]).strip() for h in hooks)
        async_hook = SlurmAsyncHook("slurm_cert")
        states = asyncio.run(async_hook.get_states(["999999"], ResolveOptions()))
        assert "999999" in states
        assert cert_login.logins() - before == 1
        assert sum(h.openssh.logins for h in hooks) == 1, "the first hook logged in, the rest rode on it"
    finally:
        _exit_master(_settings(conn))


@pytest.mark.parametrize(("validity", "match"), [("-2h:-1h", "expired at"), ("-1m:+2m", "expires at")])
def test_an_expired_certificate_fails_before_any_login(site, cert_login, monkeypatch, validity, match):
    _cert_conn(site, cert_login, monkeypatch, f"cert{validity[-2:]}", validity,
                      certificate_min_validity=600, renew_hint="sshproxy.sh -u someone")
    before = cert_login.connections()
    started = time.monotonic()
    with pytest.raises(SSHCertificateExpired, match=match) as caught:
        SlurmHook("slurm_cert").run(["squeue"])
    assert caught.value.command == "sshproxy.sh -u someone"
    update, _ = asyncio.run(_poll_once("slurm_cert"))
    assert update.error and "sshproxy.sh -u someone" in update.error
    assert time.monotonic() - started < 5
    assert cert_login.connections() == before, "the certificate was checked before connecting"
