"""The OpenSSH transport's I/O: the system ``ssh`` over one ControlMaster, for both hooks.

The transport is three operations - run a command (stdin in, stdout/stderr/exit out), write a
file, fetch a file or tree - which :class:`~slurmflow.hooks.slurm.SlurmHook` does over paramiko
(SFTP) by default and over ``ssh`` here: files travel on stdin/stdout (``cat``, ``tar``) through
the same master, so there is one login and no SFTP subsystem to depend on.

What to run and how to read the answers is written once, as generators that yield a
:class:`Proc` (run this argv) or a :class:`Pause` and receive the result (the pattern of
:func:`slurmflow.status.run_sync`); :class:`OpenSSHTransport` drives them with ``subprocess``
for tasks, :class:`AsyncOpenSSHTransport` with asyncio for the triggerer's poller.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from slurmflow.errors import SlurmConnectionError, SlurmTimeoutError, SSHCertificateExpired, SSHReauthRequired
from slurmflow.openssh import (
    MISSING_EXIT,
    NO_MASTER_MARKS,
    OpenSSHSettings,
    certificate_problem,
    check_argv,
    command_argv,
    download_command,
    failure_kind,
    login_argv,
    master_command,
    parse_validity,
    write_command,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Result = tuple[int, bytes, bytes]

#: What ssh itself prints when *it* failed (as opposed to a remote command exiting 255).
_SSH_FAILED = ("ssh:", "kex_exchange_identification", "Connection closed", "Connection to ", "mux_client",
               "Control socket", "ControlSocket", "client_loop", "Permission denied", "Host key verification",
               "Timeout, server", "Connection timed out", "Connection refused", "banner exchange")


@dataclass(frozen=True)
class Proc:
    """Run ``argv`` locally (an ``ssh`` or ``ssh-keygen``), feeding it ``stdin``."""

    argv: list[str]
    stdin: bytes = b""
    timeout: float | None = None
    env: dict[str, str] | None = field(default=None, hash=False)
    #: stderr to a file, not a pipe: a login's ProxyCommand (the bastion hop) inherits stderr and
    #: lives as long as the master, so a pipe would not reach EOF until the master ends.
    stderr_file: bool = False


@dataclass(frozen=True)
class Pause:
    seconds: float


Steps = Generator[Proc | Pause, Any, T]


class _Logic:
    """What the sync and async transports share: everything but starting processes.

    :param settings: how to reach the login node.
    :param connect_patience: seconds to keep trying an unreachable login node before giving up
        (as ``SlurmHook._client`` does for paramiko); a refused login is never retried.
    """

    def __init__(self, settings: OpenSSHSettings, *, connect_patience: float = 150.0,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.connect_patience = connect_patience
        self._clock, self._now = clock, now
        self.ready = False
        #: Logins this transport made (masters it opened): what the benchmark counts.
        self.logins = 0

    @property
    def address(self) -> str:
        return self.settings.address

    def _reauth(self, reason: str) -> SSHReauthRequired:
        return SSHReauthRequired(reason, master_command(self.settings))

    def prepare(self) -> Steps[None]:
        """Make sure a master is there: reuse one, or (not reuse-only) log in once and keep it."""
        s = self.settings
        _ensure_socket_dir(s.control_path)
        status, _out, _err = yield Proc(check_argv(s), timeout=15)
        if status == 0:
            self.ready = True
            return
        if s.reuse_only:
            raise self._reauth(f"no SSH master to {s.address} is open (ControlPath {s.control_path}); "
                               "the connection is reuse_only, so Airflow never logs in by itself")
        if s.certificate_file:
            yield from self._check_certificate()
        deadline, delay = self._clock() + self.connect_patience, 2.0
        while True:
            status, _out, err = yield Proc(login_argv(s), timeout=s.conn_timeout + 60, stderr_file=True)
            if status == 0:
                self.logins += 1
                self.ready = True
                return
            text = _text(err)
            kind = failure_kind(text)
            if kind == "auth":
                raise self._reauth(f"the login node {s.address} refused the login: {text}")
            if kind == "hostkey":
                raise SlurmConnectionError(f"host key of {s.address} not accepted: {text}")
            if self._clock() + delay > deadline:
                raise SlurmConnectionError(f"cannot connect to the Slurm login node {s.address}: {text}")
            log.warning("cannot connect to %s (%s); trying again in %.0f s", s.address, text, delay)
            yield Pause(delay)
            delay = min(delay * 2, 30.0)

    def _check_certificate(self) -> Steps[None]:
        s = self.settings
        cert = os.path.expanduser(s.certificate_file or "")
        # ssh-keygen prints validity in local time: UTC makes it unambiguous.
        status, out, err = yield Proc(["ssh-keygen", "-L", "-f", cert], timeout=15,
                                      env={**os.environ, "TZ": "UTC0"})
        if status != 0:
            raise SSHCertificateExpired(f"cannot read the SSH certificate {cert}: {_text(err) or _text(out)}",
                                        s.renew_hint)
        try:
            problem = certificate_problem(parse_validity(_text(out)), self._now(), s.certificate_min_validity)
        except ValueError as exc:
            raise SSHCertificateExpired(f"the SSH certificate {cert}: {exc}", s.renew_hint) from exc
        if problem:
            raise SSHCertificateExpired(f"the SSH certificate {cert} {problem}", s.renew_hint)

    def execute(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> Steps[Result]:
        """Run ``command`` over the master; ``(exit, stdout, stderr)``. A master that vanished
        before the command reached it is opened again (not reuse-only) and the command sent once
        more; one that broke during the command is an ambiguous failure, as with paramiko."""
        s = self.settings
        for attempt in (1, 2):
            if not self.ready:
                yield from self.prepare()
            status, out, err = yield Proc(command_argv(s, command), stdin, timeout)
            if status != 255:
                return status, out, err
            alive = (yield Proc(check_argv(s), timeout=15))[0] == 0
            text = _text(err)
            if alive and not any(m in text for m in _SSH_FAILED):
                return status, out, err  # the remote command's own 255
            self.ready = False
            never_ran = not alive and any(m in text for m in NO_MASTER_MARKS)
            if never_ran and s.reuse_only:
                raise self._reauth(f"the SSH master to {s.address} is gone (ControlPath {s.control_path})")
            if not never_ran or attempt == 2:
                break
            log.info("the SSH master to %s is gone; logging in again", s.address)
        raise SlurmConnectionError(f"connection to {s.address} failed while running a command: {text}")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


def _ensure_socket_dir(control_path: str) -> None:
    """ssh does not create the socket's folder; make it owner-only (the socket is a login)."""
    folder = os.path.dirname(os.path.expanduser(control_path))
    if folder and "%" not in folder and not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)


def _timeout(proc: Proc, limit: float) -> SlurmTimeoutError:
    return SlurmTimeoutError(f"ssh command did not finish within {limit:.0f}s: {proc.argv[-1][:200]}")


class OpenSSHTransport(_Logic):
    """Blocking side, for tasks (``SlurmHook``)."""

    def _drive(self, steps: Steps[T]) -> T:
        try:
            request = next(steps)
            while True:
                if isinstance(request, Pause):
                    time.sleep(request.seconds)
                    request = steps.send(None)
                else:
                    request = steps.send(self._run(request))
        except StopIteration as stop:
            return stop.value

    @staticmethod
    def _run(proc: Proc) -> Result:
        with tempfile.TemporaryFile() as errfile:
            try:
                done = subprocess.run(proc.argv, input=proc.stdin, stdout=subprocess.PIPE,
                                      stderr=errfile if proc.stderr_file else subprocess.PIPE,
                                      timeout=proc.timeout, env=proc.env, check=False)
            except subprocess.TimeoutExpired as exc:
                raise _timeout(proc, proc.timeout or 0) from exc
            except OSError as exc:  # no ssh binary, too many processes...
                raise SlurmConnectionError(f"cannot run {proc.argv[0]}: {exc}") from exc
            errfile.seek(0)
            return done.returncode, done.stdout, errfile.read() if proc.stderr_file else done.stderr

    def exec(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> Result:
        return self._drive(self.execute(command, stdin, timeout))

    def ensure_ready(self) -> None:
        self._drive(self.prepare())

    def upload(self, path: str, data: bytes, mode: int, timeout: float | None = None) -> None:
        status, _out, err = self.exec(write_command(path, mode), data, timeout)
        if status != 0:
            raise SlurmConnectionError(f"upload of {path} to {self.address} failed: {_text(err)}")

    def download(self, remote: str, local: Path, timeout: float | None = None) -> bool:
        status, out, err = self.exec(download_command(remote), timeout=timeout)
        if status == MISSING_EXIT:
            return False
        if status != 0:
            raise SlurmConnectionError(f"download of {remote} from {self.address} failed: {_text(err)}")
        _unpack(out, local)
        return True


def _unpack(archive: bytes, local: Path) -> None:
    """Put the one entry of ``archive`` (a file or a tree) at ``local``, merging into a folder
    that is already there (as the SFTP download does)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local.parent, prefix=".slurmflow-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")
        (entry,) = list(Path(tmp).iterdir())
        if entry.is_dir():
            shutil.copytree(entry, local, dirs_exist_ok=True)
        else:
            os.replace(entry, local)


class AsyncOpenSSHTransport(_Logic):
    """Async side, for the triggerer's poller (``SlurmAsyncHook``). A lock keeps concurrent
    commands from each opening a master."""

    def __init__(self, settings: OpenSSHSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._lock = asyncio.Lock()

    async def _drive(self, steps: Steps[T]) -> T:
        try:
            request = next(steps)
            while True:
                if isinstance(request, Pause):
                    await asyncio.sleep(request.seconds)
                    request = steps.send(None)
                else:
                    request = steps.send(await self._run(request))
        except StopIteration as stop:
            return stop.value

    @staticmethod
    async def _run(proc: Proc) -> Result:
        with tempfile.TemporaryFile() as errfile:
            try:
                child = await asyncio.create_subprocess_exec(
                    *proc.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=errfile if proc.stderr_file else subprocess.PIPE, env=proc.env)
            except OSError as exc:
                raise SlurmConnectionError(f"cannot run {proc.argv[0]}: {exc}") from exc
            try:
                async with asyncio.timeout(proc.timeout):
                    out, err = await child.communicate(proc.stdin)
            except TimeoutError as exc:
                child.kill()
                await child.wait()
                raise _timeout(proc, proc.timeout or 0) from exc
            except asyncio.CancelledError:
                child.kill()
                raise
            if proc.stderr_file:
                errfile.seek(0)
                err = errfile.read()
            return child.returncode if child.returncode is not None else 255, out, err or b""

    async def ensure_ready(self) -> None:
        async with self._lock:
            if not self.ready:
                await self._drive(self.prepare())

    async def exec(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> Result:
        if not self.ready:
            await self.ensure_ready()
        return await self._drive(self.execute(command, stdin, timeout))
