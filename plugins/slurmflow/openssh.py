"""The OpenSSH transport's pure part: settings from a connection, ``ssh`` argv, certificate dates.

A connection with the extra ``{"transport": "openssh"}`` is reached by running the system
``ssh`` (:mod:`slurmflow.hooks.openssh` does the I/O) instead of paramiko/asyncssh: every
command rides one ControlMaster connection, so a site that demands MFA sees one login, made by
a person, and none from Airflow. ``BatchMode=yes`` on every command: ssh never prompts, it
fails, and the hook turns that into :class:`~slurmflow.errors.SSHReauthRequired` carrying the
command a person runs to log in again.

No I/O and no Airflow imports here: what is built is tested as data.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

#: Where masters' sockets go; ``%C`` is ssh's hash of (local host, host, port, user), so each
#: login node gets its own and the path stays far below the 104-byte socket-path limit.
DEFAULT_CONTROL_PATH = "~/.ssh/slurmflow/%C"
DEFAULT_RENEW_HINT = "renew the certificate (e.g. NERSC: sshproxy.sh -u <user>)"

_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}$")
_JUMP = re.compile(r"^(?:([A-Za-z0-9_.][A-Za-z0-9_.-]{0,63})@)?([A-Za-z0-9_.][A-Za-z0-9_.-]{0,252})(?::(\d{1,5}))?$")
_DURATION = re.compile(r"^(yes|no|\d+[smhdw]?)$")
_TRUE = {"true", "1", "yes", "on"}

#: Extras this transport reads (besides the SSH provider's ``key_file``, ``no_host_key_check``,
#: ``known_hosts``, ``conn_timeout``): what docs/CONTRACTS.md and the README list.
EXTRAS = ("transport", "control_path", "control_persist", "reuse_only", "proxy_jump",
          "certificate_file", "certificate_min_validity", "renew_hint", "ssh_config", "ssh_binary")


def uses_openssh(extra: Mapping[str, Any]) -> bool:
    """Whether a connection's extras choose this transport (anything else: paramiko)."""
    transport = str(extra.get("transport") or "paramiko").lower()
    if transport not in ("paramiko", "openssh"):
        raise ValueError(f"unknown SSH transport {transport!r}: use 'paramiko' (default) or 'openssh'")
    return transport == "openssh"


def _flag(value: Any) -> bool:
    return str(value).lower() in _TRUE


@dataclass(frozen=True)
class Jump:
    """A bastion (``[user@]host[:port]``)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Jump:
        match = _JUMP.match(text.strip())
        if not match:
            raise ValueError(f"proxy_jump must be [user@]host[:port] (one bastion), not {text!r}")
        user, host, port = match.groups()
        return cls(host, user, int(port) if port else None)


@dataclass(frozen=True)
class OpenSSHSettings:
    """How to reach one login node with the system ``ssh``.

    :param host: the login node.
    :param user: the cluster user.
    :param port: its sshd port.
    :param key_file: private key (``-i``, with ``IdentitiesOnly``); ``None``: ssh's defaults/agent.
    :param certificate_file: the key's certificate (``CertificateFile``); its expiry is checked
        before any login this transport makes.
    :param proxy_jump: a bastion in front of the login node.
    :param control_path: the master's socket (ssh ``%`` tokens allowed).
    :param control_persist: how long a master this transport opened stays after its last use.
    :param reuse_only: never log in: use the master a person opened (after MFA) or fail.
    :param no_host_key_check: accept any host key (local stacks only).
    :param known_hosts: a known_hosts file to check host keys against.
    :param conn_timeout: seconds for the TCP connection (``ConnectTimeout``).
    :param certificate_min_validity: seconds a certificate must still be valid for a login.
    :param renew_hint: what the error tells a person to do about an expired certificate.
    :param ssh_config: an ssh_config file (``-F``) for what these settings do not cover.
    :param ssh_binary: the ``ssh`` program.
    """

    host: str
    user: str
    port: int = 22
    key_file: str | None = None
    certificate_file: str | None = None
    proxy_jump: Jump | None = None
    control_path: str = DEFAULT_CONTROL_PATH
    control_persist: str = "30m"
    reuse_only: bool = False
    no_host_key_check: bool = False
    known_hosts: str | None = None
    conn_timeout: int = 10
    certificate_min_validity: int = 600
    renew_hint: str = DEFAULT_RENEW_HINT
    ssh_config: str | None = None
    ssh_binary: str = "ssh"

    def __post_init__(self) -> None:
        if not _HOST.match(self.host) or self.host.startswith("-"):
            raise ValueError(f"not a host name: {self.host!r}")
        if not _USER.match(self.user):
            raise ValueError(f"not a user name: {self.user!r}")
        if not _DURATION.match(self.control_persist):
            raise ValueError(f"control_persist is yes, no or a duration (30m, 12h), not {self.control_persist!r}")

    @classmethod
    def from_connection(cls, host: str | None, port: int | None, login: str | None,
                        extra: Mapping[str, Any]) -> OpenSSHSettings:
        """Read an Airflow SSH connection's fields and extras (see :data:`EXTRAS`)."""
        if not host or not login:
            raise ValueError("an openssh connection needs a host and a login")
        jump = extra.get("proxy_jump")
        known_hosts = extra.get("known_hosts")
        return cls(
            host=host,
            user=login,
            port=int(port or 22),
            key_file=extra.get("key_file") or None,
            certificate_file=extra.get("certificate_file") or None,
            proxy_jump=Jump.parse(jump) if jump else None,
            control_path=extra.get("control_path") or DEFAULT_CONTROL_PATH,
            control_persist=str(extra.get("control_persist") or "30m"),
            reuse_only=_flag(extra.get("reuse_only", False)),
            no_host_key_check=_flag(extra.get("no_host_key_check", False)),
            # the provider's known_hosts may also be "none" (no check) - same as no_host_key_check
            known_hosts=known_hosts if known_hosts and str(known_hosts).lower() != "none" else None,
            conn_timeout=int(extra.get("conn_timeout") or 10),
            certificate_min_validity=int(extra.get("certificate_min_validity", 600)),
            renew_hint=extra.get("renew_hint") or DEFAULT_RENEW_HINT,
            ssh_config=extra.get("ssh_config") or None,
            ssh_binary=extra.get("ssh_binary") or "ssh",
        )

    @property
    def address(self) -> str:
        via = f" via {self.proxy_jump.host}" if self.proxy_jump else ""
        return f"{self.user}@{self.host}:{self.port}{via}"


Mode = Literal["auto", "reuse"]


def _identity(s: OpenSSHSettings) -> list[str]:
    opts: list[str] = []
    if s.ssh_config:
        opts += ["-F", s.ssh_config]
    if s.key_file:
        # IdentitiesOnly: offer this key, not every key of an agent (sites count failed offers).
        opts += ["-i", s.key_file, "-o", "IdentitiesOnly=yes"]
    if s.certificate_file:
        opts += ["-o", f"CertificateFile={s.certificate_file}"]
    if s.no_host_key_check:
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    elif s.known_hosts:
        opts += ["-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    return opts


def _escape_percent(value: str) -> str:
    return value.replace("%", "%%")


def _proxy_command(s: OpenSSHSettings) -> str:
    """The bastion hop as a ProxyCommand. Not ``-J``: ssh starts the jump hop with none of our
    ``-i``/``-o`` options (only ``-F``), so a key, certificate or host-key setting given here
    would not reach the bastion; here the hop gets the same ones."""
    jump = s.proxy_jump
    assert jump is not None
    argv = [s.ssh_binary, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={s.conn_timeout}", *_identity(s),
            "-l", jump.user or s.user, "-p", str(jump.port or 22), "-W", "%h:%p", jump.host]
    # ssh expands %-tokens in ProxyCommand: escape ours, keep the %h:%p we mean.
    return " ".join("%h:%p" if a == "%h:%p" else shlex.quote(_escape_percent(a)) for a in argv)


def _target(s: OpenSSHSettings) -> list[str]:
    return ["-l", s.user, "-p", str(s.port), s.host]


def _common(s: OpenSSHSettings) -> list[str]:
    return ["-o", "BatchMode=yes", "-o", f"ControlPath={s.control_path}",
            "-o", f"ConnectTimeout={s.conn_timeout}", "-o", "ServerAliveInterval=30"]


def command_argv(s: OpenSSHSettings, command: str) -> list[str]:
    """Run ``command`` (a shell string, already quoted) on the login node over the master.

    A command never logs in: ``ControlMaster=no`` plus a ProxyCommand that fails at once,
    because ssh falls back to a connection of its own when the socket is gone, and with MFA that
    is a failed login (some sites lock accounts after a few). Only :func:`login_argv` logs in.
    """
    return [s.ssh_binary, *_common(s), "-o", "ControlMaster=no", "-o", "ProxyCommand=false",
            *_identity(s), *_target(s), "--", command]


#: What ssh prints when :func:`command_argv` found no master and its fallback ProxyCommand
#: failed: the command never reached the login node, so running it again is safe.
NO_MASTER_MARKS = ("kex_exchange_identification", "UNKNOWN port 65535")


def login_argv(s: OpenSSHSettings) -> list[str]:
    """The one login Airflow makes (not reuse-only): a no-op whose connection stays on as the
    master for ``control_persist`` (``ControlMaster=auto``: a master another task opened
    meanwhile is used instead)."""
    opts = ["-o", "ControlMaster=auto", "-o", f"ControlPersist={s.control_persist}"]
    if s.proxy_jump:
        opts += ["-o", f"ProxyCommand={_proxy_command(s)}"]
    return [s.ssh_binary, *_common(s), *opts, *_identity(s), *_target(s), "--", "true"]


def check_argv(s: OpenSSHSettings) -> list[str]:
    """``ssh -O check``: is a master listening on the control path (exit 0)? Local only."""
    return [s.ssh_binary, *(["-F", s.ssh_config] if s.ssh_config else []),
            "-o", f"ControlPath={s.control_path}", "-O", "check", *_target(s)]


def master_argv(s: OpenSSHSettings) -> list[str]:
    """What a person runs (on the machine of the Airflow workers and triggerer, as their user)
    to open the master interactively, MFA and all; then every task rides on it."""
    opts = ["-M", "-S", s.control_path, "-fN", "-o", "ServerAliveInterval=30"]
    if s.proxy_jump:
        opts += ["-o", f"ProxyCommand={_proxy_command(s)}"]
    # No BatchMode: this login is the one that may prompt (password, OTP).
    return [s.ssh_binary, *opts, *_identity(s), *_target(s)]


def master_command(s: OpenSSHSettings) -> str:
    return shlex.join(master_argv(s))


def write_command(path: str, mode: int) -> str:
    """Write stdin to ``path`` with ``mode``: the file is owner-only from its creation (umask 077,
    a fresh temporary name) and takes its place by rename, so no reader ever sees a secret with a
    wider mode or half a script."""
    target = shlex.quote(path)
    tmp = shlex.quote(path + ".slurmflow-part")
    return f"umask 077 && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {target}"


#: ``download_command``'s exit status when the remote path does not exist.
MISSING_EXIT = 44


def download_command(path: str) -> str:
    """A gzipped tar of ``path`` (file or tree) on stdout, its entry named ``.``-relative
    ``./<basename>``; exits :data:`MISSING_EXIT` when ``path`` does not exist."""
    parent, _, name = path.rstrip("/").rpartition("/")
    q_path, q_parent, q_name = shlex.quote(path), shlex.quote(parent or "/"), shlex.quote(name)
    return f"if [ -e {q_path} ]; then tar -C {q_parent} -czf - -- {q_name}; else exit {MISSING_EXIT}; fi"


# --- failures ------------------------------------------------------------------------------------

_AUTH = ("Permission denied", "Too many authentication failures", "no mutual signature",
         "Authentication failed", "certificate invalid", "Certificate invalid")
_HOSTKEY = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
            "No ED25519 host key is known", "host key is known for")


def failure_kind(stderr: str) -> Literal["auth", "hostkey", "network"]:
    """Why ``ssh`` exited 255: a refused login and a host key mismatch need a person; anything
    else (refused, timed out, reset) may pass."""
    if any(m in stderr for m in _HOSTKEY):
        return "hostkey"
    if any(m in stderr for m in _AUTH):
        return "auth"
    return "network"


# --- certificates ----------------------------------------------------------------------------------

_VALID = re.compile(r"^\s*Valid:\s*(.+?)\s*$", re.MULTILINE)
_STAMP = r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})"


def _stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def parse_validity(listing: str) -> tuple[datetime | None, datetime | None]:
    """``(valid from, valid to)`` from ``ssh-keygen -L`` run with ``TZ=UTC0`` (it prints local
    time); ``None`` for an open end (``forever``, ``after X``, ``before Y``).

    :raises ValueError: the listing has no ``Valid:`` line (not a certificate).
    """
    match = _VALID.search(listing)
    if not match:
        raise ValueError("not an OpenSSH certificate (ssh-keygen -L printed no 'Valid:' line)")
    text = match.group(1)
    if text == "forever":
        return None, None
    if m := re.fullmatch(rf"from {_STAMP} to {_STAMP}", text):
        return _stamp(m.group(1)), _stamp(m.group(2))
    if m := re.fullmatch(rf"after {_STAMP}", text):
        return _stamp(m.group(1)), None
    if m := re.fullmatch(rf"before {_STAMP}", text):
        return None, _stamp(m.group(1))
    raise ValueError(f"unreadable certificate validity: {text!r}")


def certificate_problem(valid: tuple[datetime | None, datetime | None], now: datetime,
                        min_validity: float) -> str | None:
    """Why a certificate cannot be used for a login now (``None``: it can)."""
    start, end = valid
    if start is not None and now < start:
        return f"is not valid before {start:%Y-%m-%d %H:%M:%S} UTC"
    if end is not None:
        left = (end - now).total_seconds()
        if left <= 0:
            return f"expired at {end:%Y-%m-%d %H:%M:%S} UTC"
        if left < min_validity:
            return (f"expires at {end:%Y-%m-%d %H:%M:%S} UTC, in {left:.0f} s "
                    f"(less than certificate_min_validity={min_validity:.0f} s)")
    return None
