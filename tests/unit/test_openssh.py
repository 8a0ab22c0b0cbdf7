"""The OpenSSH transport: settings, argv, certificate dates, and its decisions over a fake ``ssh``.

The real thing (sshd demanding two factors, a bastion, certificates) is
tests/integration/test_openssh_transport.py.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from datetime import UTC, datetime

import pytest

from slurmflow.errors import SlurmConnectionError, SSHCertificateExpired, SSHReauthRequired
from slurmflow.hooks.openssh import AsyncOpenSSHTransport, OpenSSHTransport, Pause, Proc
from slurmflow.openssh import (
    Jump,
    OpenSSHSettings,
    certificate_problem,
    check_argv,
    command_argv,
    download_command,
    failure_kind,
    login_argv,
    master_command,
    parse_validity,
    uses_openssh,
    write_command,
)

EXTRA = {"transport": "openssh", "key_file": "/keys/id", "certificate_file": "/keys/id-cert.pub",
         "proxy_jump": "jump@bastion.example.org:2200", "control_path": "/run/sf/%C", "control_persist": "12h",
         "reuse_only": "true", "no_host_key_check": False, "known_hosts": "/keys/known_hosts", "conn_timeout": 7}


def settings(**overrides) -> OpenSSHSettings:
    extra = {**EXTRA, **overrides}
    return OpenSSHSettings.from_connection("login.example.org", 2222, "alice", extra)


# --- settings ---------------------------------------------------------------------------------------


def test_the_connection_extra_chooses_the_transport():
    assert uses_openssh({"transport": "openssh"}) and uses_openssh({"transport": "OpenSSH"})
    assert not uses_openssh({}) and not uses_openssh({"transport": "paramiko"})
    with pytest.raises(ValueError, match="unknown SSH transport 'libssh'"):
        uses_openssh({"transport": "libssh"})


def test_settings_from_a_connection():
    s = settings()
    assert (s.host, s.port, s.user, s.reuse_only, s.conn_timeout) == ("login.example.org", 2222, "alice", True, 7)
    assert s.proxy_jump == Jump("bastion.example.org", "jump", 2200)
    assert s.address == "alice@login.example.org:2222 via bastion.example.org"
    defaults = OpenSSHSettings.from_connection("h", None, "u", {"transport": "openssh"})
    assert (defaults.port, defaults.control_path, defaults.control_persist, defaults.reuse_only) == (
        22, "~/.ssh/slurmflow/%C", "30m", False)
    # the provider's "known_hosts: none" means no host key check, not a file named none
    assert OpenSSHSettings.from_connection("h", 22, "u", {"known_hosts": "none"}).known_hosts is None


@pytest.mark.parametrize(("field", "value", "message"), [
    ("host", "-oProxyCommand=x", "not a host"), ("user", "a b", "not a user"),
    ("control_persist", "1 h; rm", "control_persist"),
])
def test_settings_refuse_values_that_could_become_options(field, value, message):
    with pytest.raises(ValueError, match=message):
        OpenSSHSettings(**{"host": "h", "user": "u", field: value})


@pytest.mark.parametrize("jump", ["a@b@c", "host:port", "b1,b2", "-oX"])
def test_one_bastion_in_the_ssh_form(jump):
    with pytest.raises(ValueError, match="proxy_jump"):
        Jump.parse(jump)


def test_a_connection_without_host_or_login_is_refused():
    with pytest.raises(ValueError, match="host and a login"):
        OpenSSHSettings.from_connection("h", 22, None, {})


# --- argv --------------------------------------------------------------------------------------------


def _opts(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


def test_a_command_never_logs_in_and_never_prompts():
    argv = command_argv(settings(), "squeue --me -h -o '%i %T'")
    opts = _opts(argv)
    assert opts["BatchMode"] == "yes" and opts["ControlMaster"] == "no" and opts["ProxyCommand"] == "false"
    assert opts["ControlPath"] == "/run/sf/%C" and opts["ConnectTimeout"] == "7"
    assert opts["CertificateFile"] == "/keys/id-cert.pub" and opts["IdentitiesOnly"] == "yes"
    assert opts["UserKnownHostsFile"] == "/keys/known_hosts" and opts["StrictHostKeyChecking"] == "yes"
    assert argv[-3:] == ["login.example.org", "--", "squeue --me -h -o '%i %T'"], "the command is one argument"
    assert argv[argv.index("-i") + 1] == "/keys/id"


def test_the_login_keeps_its_connection_as_the_master_through_the_bastion():
    argv = login_argv(settings(reuse_only=False))
    opts = _opts(argv)
    assert opts["ControlMaster"] == "auto" and opts["ControlPersist"] == "12h" and opts["BatchMode"] == "yes"
    hop = shlex.split(opts["ProxyCommand"])
    # The bastion hop carries the same key, certificate and host-key settings (ssh -J would not).
    assert hop[:3] == ["ssh", "-o", "BatchMode=yes"] and hop[-5:] == ["-p", "2200", "-W", "%h:%p", "bastion.example.org"]
    assert "/keys/id" in hop and "CertificateFile=/keys/id-cert.pub" in hop and hop[hop.index("-l") + 1] == "jump"
    assert argv[-2:] == ["--", "true"]


def test_percent_signs_of_ours_are_escaped_in_the_proxy_command():
    hop = _opts(login_argv(settings(key_file="/keys/100%/id")))["ProxyCommand"]
    assert "/keys/100%%/id" in hop and "%h:%p" in hop


def test_the_check_is_local_and_matches_the_master_path():
    argv = check_argv(settings(ssh_config="/etc/sf/ssh_config"))
    assert argv == ["ssh", "-F", "/etc/sf/ssh_config", "-o", "ControlPath=/run/sf/%C", "-O", "check",
                    "-l", "alice", "-p", "2222", "login.example.org"]


def test_the_command_a_person_runs_opens_the_master_with_prompts_allowed():
    command = master_command(settings())
    argv = shlex.split(command)
    assert argv[:5] == ["ssh", "-M", "-S", "/run/sf/%C", "-fN"]
    assert "BatchMode=yes" not in argv and argv[-5:] == ["-l", "alice", "-p", "2222", "login.example.org"]
    assert "ProxyCommand=" in command and "CertificateFile=/keys/id-cert.pub" in argv


def test_host_key_checking_off_only_when_asked():
    opts = _opts(command_argv(settings(no_host_key_check=True, known_hosts=None), "true"))
    assert opts["StrictHostKeyChecking"] == "no" and opts["UserKnownHostsFile"] == "/dev/null"
    plain = _opts(command_argv(OpenSSHSettings("h", "u"), "true"))
    assert "StrictHostKeyChecking" not in plain and "UserKnownHostsFile" not in plain


def test_file_commands_quote_paths_and_create_owner_only(tmp_path):
    target = tmp_path / "a dir; rm -rf x" / "secrets.env"
    target.parent.mkdir()
    subprocess.run(["sh", "-c", write_command(str(target), 0o600)], input=b"A=1\n", check=True)
    assert target.read_bytes() == b"A=1\n" and oct(target.stat().st_mode & 0o777) == "0o600"
    subprocess.run(["sh", "-c", write_command(str(target), 0o700)], input=b"#!/bin/sh\n", check=True)
    assert oct(target.stat().st_mode & 0o777) == "0o700" and list(target.parent.iterdir()) == [target]
    assert subprocess.run(["sh", "-c", download_command(str(tmp_path / "absent"))]).returncode == 44
    out = subprocess.run(["sh", "-c", download_command(str(target.parent))], capture_output=True, check=True).stdout
    assert out[:2] == b"\x1f\x8b"


def test_why_ssh_failed():
    assert failure_kind("alice@login: Permission denied (publickey,password).") == "auth"
    assert failure_kind("Host key verification failed.") == "hostkey"
    assert failure_kind("ssh: connect to host login port 22: Connection refused") == "network"


# --- certificates --------------------------------------------------------------------------------------

LISTING = """/keys/id-cert.pub:
        Type: ssh-ed25519-cert-v01@openssh.com user certificate
        Signing CA: ED25519 SHA256:abc (using ssh-ed25519)
        Key ID: "alice"
        Serial: 0
        Valid: from 2026-12-03T09:00:00 to 2026-12-04T09:00:00
        Principals:
                alice
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_certificate_validity_from_ssh_keygen():
    assert parse_validity(LISTING) == (at("2026-12-03T09:00:00"), at("2026-12-04T09:00:00"))
    assert parse_validity("        Valid: forever\n") == (None, None)
    assert parse_validity("Valid: after 2026-01-01T00:00:00") == (at("2026-01-01T00:00:00"), None)
    assert parse_validity("Valid: before 2026-01-01T00:00:00") == (None, at("2026-01-01T00:00:00"))
    with pytest.raises(ValueError, match="not an OpenSSH certificate"):
        parse_validity("ssh-ed25519 AAAA... plain key")


def test_a_certificate_must_be_valid_for_a_while_yet():
    valid = parse_validity(LISTING)
    assert certificate_problem(valid, at("2026-12-03T12:00:00"), 600) is None
    assert certificate_problem(valid, at("2026-12-04T10:00:00"), 600) == "expired at 2026-12-04 09:00:00 UTC"
    soon = certificate_problem(valid, at("2026-12-04T08:55:00"), 600)
    assert soon and "in 300 s" in soon and "certificate_min_validity=600" in soon
    assert "not valid before" in certificate_problem(valid, at("2026-12-03T08:00:00"), 600)
    assert certificate_problem((None, None), at("2099-01-01T00:00:00"), 600) is None


# --- the transport's decisions, over a fake ssh ----------------------------------------------------------


class FakeSSH:
    """Answers each Proc by what it is: the master check, the login, ssh-keygen, a command."""

    def __init__(self, *, master=False, login=(0, b""), command=(0, b"ok\n", b""), listing=LISTING):
        self.master, self.login, self.command, self.listing = master, login, command, listing
        self.calls: list[str] = []
        self.pauses: list[float] = []

    def __call__(self, proc: Proc):
        argv = proc.argv
        if "-O" in argv:
            self.calls.append("check")
            return (0 if self.master else 255), b"", b"" if self.master else b"Control socket connect: No such file"
        if argv[0] == "ssh-keygen":
            self.calls.append("keygen")
            assert proc.env and proc.env["TZ"] == "UTC0"
            return 0, self.listing.encode(), b""
        if argv[-1] == "true" and _opts(argv).get("ControlMaster") == "auto":
            self.calls.append("login")
            assert proc.stderr_file, "a login's stderr goes to a file (the bastion hop holds it)"
            status, err = self.login if isinstance(self.login, tuple) else self.login.pop(0)
            self.master = self.master or status == 0
            return status, b"", err
        self.calls.append("cmd")
        if not self.master:
            return 255, b"", b"kex_exchange_identification: Connection closed by remote host\r\n" \
                             b"Connection closed by UNKNOWN port 65535"
        return self.command


def transport(fake: FakeSSH, now="2026-12-03T12:00:00", **overrides) -> OpenSSHTransport:
    t = OpenSSHTransport(settings(**{"reuse_only": False, "proxy_jump": None, **overrides}),
                         connect_patience=10, clock=lambda: 0.0, now=lambda: at(now))
    t._run = fake  # type: ignore[method-assign]
    return t


def test_reuse_only_fails_at_once_without_a_master_and_names_the_command():
    fake = FakeSSH(master=False)
    t = transport(fake, reuse_only=True)
    with pytest.raises(SSHReauthRequired, match="reuse_only") as caught:
        t.exec("squeue")
    assert fake.calls == ["check"], "no login, no command: just the local check"
    assert caught.value.command.startswith("ssh -M -S /run/sf/%C -fN ")
    assert str(caught.value).endswith(caught.value.command)


def test_reuse_only_rides_a_live_master():
    fake = FakeSSH(master=True)
    t = transport(fake, reuse_only=True)
    assert t.exec("squeue") == (0, b"ok\n", b"")
    assert t.exec("sacct") == (0, b"ok\n", b"")
    assert fake.calls == ["check", "cmd", "cmd"] and t.logins == 0


def test_a_master_gone_under_reuse_only_is_a_reauth_error():
    fake = FakeSSH(master=True)
    t = transport(fake, reuse_only=True)
    t.exec("true")
    fake.master = False
    with pytest.raises(SSHReauthRequired, match="is gone"):
        t.exec("squeue")
    assert fake.calls[-2:] == ["cmd", "check"]


def test_auto_mode_checks_the_certificate_then_logs_in_once():
    fake = FakeSSH()
    t = transport(fake)
    for _ in range(3):
        t.exec("squeue")
    assert fake.calls == ["check", "keygen", "login", "cmd", "cmd", "cmd"] and t.logins == 1


def test_an_expired_certificate_fails_before_any_login():
    fake = FakeSSH()
    t = transport(fake, now="2026-12-05T00:00:00", renew_hint="sshproxy.sh -u alice")
    with pytest.raises(SSHCertificateExpired, match="expired at 2026-12-04 09:00:00 UTC") as caught:
        t.exec("squeue")
    assert caught.value.command == "sshproxy.sh -u alice"
    assert fake.calls == ["check", "keygen"]


def test_a_live_master_needs_no_certificate_check():
    fake = FakeSSH(master=True)
    transport(fake, now="2026-12-05T00:00:00").exec("squeue")
    assert fake.calls == ["check", "cmd"]


def test_a_refused_login_is_not_retried_but_an_outage_is():
    fake = FakeSSH(login=(255, b"alice@login: Permission denied (publickey,keyboard-interactive)."))
    with pytest.raises(SSHReauthRequired, match="refused the login"):
        transport(fake, certificate_file=None).exec("squeue")
    assert fake.calls.count("login") == 1

    fake = FakeSSH(login=[(255, b"ssh: connect to host login port 2222: Connection refused"), (0, b"")])
    t = transport(fake, certificate_file=None)
    steps, pauses = t.execute("squeue"), []
    request = next(steps)
    try:
        while True:
            if isinstance(request, Pause):
                pauses.append(request.seconds)
                request = steps.send(None)
            else:
                request = steps.send(fake(request))
    except StopIteration as stop:
        assert stop.value == (0, b"ok\n", b"")
    assert pauses == [2.0] and fake.calls.count("login") == 2


def test_an_outage_past_patience_is_a_connection_error():
    fake = FakeSSH(login=(255, b"ssh: connect to host login port 2222: Connection timed out"))
    t = transport(fake, certificate_file=None)
    t.connect_patience = 0
    with pytest.raises(SlurmConnectionError, match="cannot connect") as caught:
        t.exec("squeue")
    assert not isinstance(caught.value, SSHReauthRequired)


def test_a_vanished_master_is_reopened_in_auto_mode_and_the_command_sent_again():
    fake = FakeSSH()
    t = transport(fake, certificate_file=None)
    t.exec("true")
    fake.master = False  # ControlPersist ran out between two commands
    assert t.exec("squeue") == (0, b"ok\n", b"")
    assert fake.calls == ["check", "login", "cmd", "cmd", "check", "check", "login", "cmd"]
    assert t.logins == 2


def test_a_remote_exit_255_is_the_commands_own():
    fake = FakeSSH(master=True, command=(255, b"", b"my tool failed"))
    assert transport(fake).exec("tool") == (255, b"", b"my tool failed")


def test_a_connection_lost_during_a_command_is_ambiguous():
    fake = FakeSSH(master=True, command=(255, b"", b"client_loop: send disconnect: Broken pipe"))
    with pytest.raises(SlurmConnectionError, match="failed while running a command"):
        transport(fake).exec("sbatch job.sh")
    assert fake.calls.count("cmd") == 1, "a command that may have run is not sent twice"


def test_the_async_transport_makes_the_same_decisions():
    fake = FakeSSH(master=True)
    t = AsyncOpenSSHTransport(settings(), now=lambda: at("2026-12-03T12:00:00"))

    async def run(proc):
        return fake(proc)

    t._run = run  # type: ignore[method-assign]

    async def go():
        return await asyncio.gather(t.exec("squeue"), t.exec("sacct"))

    assert asyncio.run(go()) == [(0, b"ok\n", b"")] * 2
    assert fake.calls == ["check", "cmd", "cmd"], "one check for concurrent first commands"


def test_real_processes_time_out_and_stderr_can_go_to_a_file():
    t = OpenSSHTransport(OpenSSHSettings("h", "u"))
    assert t._run(Proc(["sh", "-c", "cat; echo err >&2"], b"in", 5)) == (0, b"in", b"err\n")
    assert t._run(Proc(["sh", "-c", "echo err >&2; exit 3"], timeout=5, stderr_file=True)) == (3, b"", b"err\n")
    with pytest.raises(SlurmConnectionError, match="did not finish within 1s"):
        t._run(Proc(["sleep", "5"], timeout=1))

    async def go():
        a = AsyncOpenSSHTransport(OpenSSHSettings("h", "u"))
        assert await a._run(Proc(["sh", "-c", "cat; echo e >&2"], b"x", 5)) == (0, b"x", b"e\n")
        with pytest.raises(SlurmConnectionError, match="did not finish"):
            await a._run(Proc(["sleep", "5"], timeout=0.5))

    asyncio.run(go())
