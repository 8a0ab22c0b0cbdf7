"""Throwaway sshd servers for the OpenSSH transport's tests and benchmark (not the stack's sshd).

Each :class:`Sshd` is the system ``/usr/sbin/sshd`` on a free loopback port with its own config,
host key and log (``LogLevel VERBOSE``: one ``Accepted ...`` line per completed login, which is
what the tests count). :class:`Site` sets up a two-factor login node (``AuthenticationMethods
publickey,password``), a key-only bastion in front of it and a certificate-only node, for one
throwaway user created for the purpose (the stack's ``hpcuser`` has no password, and must keep
none) and deleted afterwards. Needs root (sshd, useradd); callers skip otherwise.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def usable() -> str | None:
    """Why these servers cannot run here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root (sshd, useradd)"
    for tool in (SSHD, "useradd", "chpasswd", "userdel", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    """One sshd on ``port``; ``settings`` are sshd_config lines on top of a key-only base."""

    root: Path
    name: str
    user: str
    settings: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> Sshd:
        host_key = _keygen(self.root / f"{self.name}_host_key", self.name)
        config = self.root / f"{self.name}_config"
        # sshd takes the first value of a keyword: the server's own settings go first.
        config.write_text("\n".join([
            *self.settings, f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {self.root}/{self.name}.pid", f"AuthorizedKeysFile {self.root}/authorized_keys",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", f"AllowUsers {self.user}", "PermitRootLogin no",
            "LogLevel VERBOSE", "MaxStartups 100:30:200", "MaxSessions 100", "Subsystem sftp internal-sftp", "",
        ]))
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            # Counts start once the probe is in the log (sshd writes it a moment later).
            while time.monotonic() < deadline and self.connections() < 0:
                time.sleep(0.05)
            return self
        raise RuntimeError(f"sshd {self.name} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def _lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def logins(self) -> int:
        """Completed logins: ``Accepted <method> for <user>`` (a two-factor login's first factor
        is logged as ``Partial publickey``, a key's check as ``Accepted key``: neither counts)."""
        return sum(1 for line in self._lines() if re.match(r"Accepted \S+ for ", line))

    def connections(self) -> int:
        """TCP connections to sshd, less the readiness probe of :meth:`start`."""
        return sum(1 for line in self._lines() if line.startswith("Connection from ")) - 1


@dataclass
class Site:
    """A throwaway user with a key and a password, a CA, and the servers that use them."""

    root: Path
    user: str
    password: str
    key: Path
    ca: Path
    servers: list[Sshd] = field(default_factory=list)
    slurm_conf: str | None = None

    @classmethod
    def create(cls, slurm_conf: str | None = None) -> Site:
        # Not below pytest's 0700 tmp folder: sshd's child runs as the user and needs its home.
        root = Path(tempfile.mkdtemp(prefix="slurmflow-sshd-"))
        root.chmod(0o755)
        user = f"sfmfa{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        home = root / "home"
        home.mkdir()
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", user],
                       check=True)
        shutil.chown(home, user)
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        key = _keygen(root / "id_ed25519", user)
        ca = _keygen(root / "ca", "slurmflow test CA")
        (root / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        return cls(root, user, password, key, ca, slurm_conf=slurm_conf)

    def _env_line(self) -> list[str]:
        return [f"SetEnv SLURM_CONF={self.slurm_conf}"] if self.slurm_conf else []

    def sshd(self, name: str, *settings: str) -> Sshd:
        server = Sshd(self.root, name, self.user, [*self._env_line(), *settings]).start()
        self.servers.append(server)
        return server

    def two_factor_login(self) -> Sshd:
        """A login node that wants a key *and* a password: Airflow alone can never log in."""
        return self.sshd("login-mfa", "PasswordAuthentication yes", "AuthenticationMethods publickey,password")

    def bastion(self) -> Sshd:
        return self.sshd("bastion", "AllowTcpForwarding yes", "AuthenticationMethods publickey")

    def cert_login(self) -> Sshd:
        """A login node that takes only certificates signed by the site's CA."""
        return self.sshd("login-cert", f"TrustedUserCAKeys {self.ca}.pub", f"AuthorizedKeysFile {self.root}/none",
                         "AuthenticationMethods publickey")

    def sign(self, validity: str, name: str) -> Path:
        """A certificate for a copy of the user's key, valid for ``validity`` (ssh-keygen -V)."""
        key = self.root / name
        shutil.copy(self.key, key)
        shutil.copy(f"{self.key}.pub", f"{key}.pub")
        key.chmod(stat.S_IRUSR | stat.S_IWUSR)
        subprocess.run(["ssh-keygen", "-q", "-s", str(self.ca), "-I", name, "-n", self.user, "-V", validity,
                        f"{key}.pub"], check=True)
        return Path(f"{key}-cert.pub")

    def askpass_env(self) -> dict[str, str]:
        """Environment for the one interactive login: ssh asks this script for the password
        (``SSH_ASKPASS_REQUIRE=force``), as a person would type it after the key."""
        script = self.root / "askpass.sh"
        script.write_text(f"#!/bin/sh\necho '{self.password}'\n")
        script.chmod(0o700)
        return {**os.environ, "SSH_ASKPASS": str(script), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        subprocess.run(["userdel", self.user], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
