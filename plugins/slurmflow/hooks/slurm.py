"""SlurmHook: the only code that talks to a Slurm login node (over the ssh provider's hooks).

Blocking side (:class:`SlurmHook`) for operators and sensors, on ``SSHHook`` (paramiko, one
cached connection, SFTP for files). Async side (:class:`SlurmAsyncHook`) for the triggerer's
shared poller, on ``SSHHookAsync`` (asyncssh) with the same connection id. Both run argv lists
built by :mod:`slurmflow.commands`, joined with ``shlex.quote``. A connection with the extra
``transport: openssh`` goes through the system ``ssh`` and one ControlMaster instead, on both
sides (:mod:`slurmflow.hooks.openssh`): the hooks hand it their commands and files and keep
everything else.
"""

from __future__ import annotations

import asyncio
import io
import posixpath
import selectors
import stat
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from airflow.providers.common.compat.sdk import BaseHook

from slurmflow import commands
from slurmflow.errors import (
    SlurmCommandError,
    SlurmConnectionError,
    SlurmSubmitError,
    SlurmTimeoutError,
)
from slurmflow.hooks.openssh import AsyncOpenSSHTransport, OpenSSHTransport
from slurmflow.identity import ExistingJob, JobKey, decide, parse_job_name
from slurmflow.logs import DEFAULT_TAIL_BYTES, LogChunk, LogRead, parse_read_logs, read_logs_command
from slurmflow.openssh import OpenSSHSettings, uses_openssh
from slurmflow.parsing import split_job_id
from slurmflow.sbatch import SbatchScript
from slurmflow.status import (
    CommandResult,
    JobSnapshot,
    ResolveOptions,
    lookup_key,
    resolve_states,
    run_async,
    run_sync,
)
from slurmflow.usage import JobUsage, parse_usage
from slurmflow.versions import SlurmFeatures, read_probe

#: sbatch errors that say "the controller did not answer", not "your job is wrong": the job
#: may or may not exist, so look it up before trying again.
_TRANSIENT_SBATCH = (
    "Socket timed out",
    "Unable to contact slurm controller",
    "temporarily unable to accept job",
    "Resource temporarily unavailable",
    "Zero Bytes were transmitted",
    "Connection refused",
)
def _login_refused(exc: BaseException) -> bool:
    """The login node answered and refused us (bad key or password): no wait fixes that."""
    import paramiko

    return isinstance(exc, paramiko.AuthenticationException | paramiko.BadHostKeyException)


_ALREADY_DONE = ("already completing or completed", "Job/step already", "Invalid job id specified")


@dataclass(frozen=True)
class SubmitOutcome:
    """What :meth:`SlurmHook.submit` did.

    :param job_id: the job (array) id now owned by the task.
    :param action: ``submitted`` (new job), ``attached`` (live job found) or ``reused``
        (a COMPLETED job of the same generation).
    :param cancelled: jobs of an earlier generation that were scancelled first.
    :param reason: one line for the task log.
    """

    job_id: str
    action: Literal["submitted", "attached", "reused"]
    cancelled: tuple[str, ...] = ()
    reason: str = ""


class SlurmHook(BaseHook):
    """Submit, query and cancel Slurm jobs through a login node reached over SSH.

    The connection is an ordinary ``ssh`` connection (host, port, login, extra ``key_file``...);
    its optional extra ``job_root`` sets where per-run job directories go (default
    ``$HOME/slurmflow-jobs`` on the cluster).

    :param slurm_conn_id: the SSH connection of the login node.
    :param cmd_timeout: seconds one remote command may take.
    :param conn_timeout: seconds to establish the SSH connection.
    :param conn_retry_attempts: connection attempts before giving up (SSHHook's retry).
    :param job_root: overrides the connection's ``job_root``.
    :param submit_attempts: sbatch attempts after ambiguous failures (each preceded by a lookup).
    :param lookup_since: how far back sacct looks for a task's earlier jobs.
    :param connect_patience: seconds to keep trying to reach an unreachable login node.
    """

    conn_name_attr = "slurm_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "ssh"
    hook_name = "Slurm (SSH)"

    def __init__(
        self,
        slurm_conn_id: str = default_conn_name,
        *,
        cmd_timeout: float = 120.0,
        conn_timeout: int | None = None,
        conn_retry_attempts: int = 2,
        job_root: str | None = None,
        submit_attempts: int = 3,
        lookup_since: str = "now-30days",
        connect_patience: float = 150.0,
    ) -> None:
        super().__init__()
        self.slurm_conn_id = slurm_conn_id
        self.cmd_timeout = cmd_timeout
        self.conn_timeout = conn_timeout
        self.conn_retry_attempts = conn_retry_attempts
        self._job_root = job_root
        self.submit_attempts = max(1, submit_attempts)
        self.lookup_since = lookup_since
        self.connect_patience = connect_patience
        self.accounting = True
        #: Commands run, by tool (argv[0]): what the benchmark and tests count.
        self.command_counts: Counter[str] = Counter()
        # The login node's Slurm release, probed once per connection (see `features`).
        self._features: SlurmFeatures | None = None
        self._version_known = False
        self.version_probes = 0

    # --- connection -----------------------------------------------------------------------

    @cached_property
    def ssh_hook(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        return SSHHook(
            ssh_conn_id=self.slurm_conn_id,
            conn_timeout=self.conn_timeout,
            cmd_timeout=self.cmd_timeout,
            conn_retry_attempts=self.conn_retry_attempts,
        )

    @cached_property
    def openssh(self) -> OpenSSHTransport | None:
        """The OpenSSH transport when the connection's extra ``transport`` is ``openssh``;
        ``None``: paramiko (the default)."""
        settings = _openssh_settings(self._connection_or_none())
        if settings is None:
            return None
        return OpenSSHTransport(settings, connect_patience=self.connect_patience)

    def _connection_or_none(self) -> Any:
        try:
            return self.get_connection(self.slurm_conn_id)
        except Exception:
            # The paramiko path reads it again and reports what is wrong with it.
            self.log.debug("connection %r not readable here", self.slurm_conn_id, exc_info=True)
            return None

    @property
    def username(self) -> str:
        """The cluster user (job paths name it)."""
        if self.openssh is not None:
            return self.openssh.settings.user
        return str(getattr(self.ssh_hook, "username", "") or "")

    @property
    def address(self) -> str:
        if self.__dict__.get("openssh") is not None:
            return self.openssh.address
        try:
            return f"{self.ssh_hook.username}@{self.ssh_hook.remote_host}:{self.ssh_hook.port}"
        except Exception:
            return self.slurm_conn_id

    def _client(self) -> Any:
        """The SSH client, connecting if needed. A login node that cannot be reached (down, sshd
        restarting, network) is tried again, backing off from 2 s, for up to ``connect_patience``
        seconds, so a task rides out a short outage inside its try instead of spending a retry on
        it (found by ``make chaos``: a 60 s sshd outage at submit used up train's one retry). A
        refused login (key, password) fails at once: waiting cannot fix it."""
        deadline, delay = time.monotonic() + self.connect_patience, 2.0
        while True:
            try:
                return self.ssh_hook.get_conn()
            except Exception as exc:
                error = SlurmConnectionError(
                    f"cannot connect to the Slurm login node {self.address} (connection "
                    f"{self.slurm_conn_id!r}): {type(exc).__name__}: {exc}")
                if _login_refused(exc) or time.monotonic() + delay > deadline:
                    raise error from exc
                self.log.warning("%s; trying again in %.0f s", error, delay)
                self._drop_connection()
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    @property
    def features(self) -> SlurmFeatures | None:
        """What the login node's Slurm release has (:mod:`slurmflow.versions`), from one
        ``scontrol --version`` per connection (a reconnect may reach another login node behind
        the same name). ``None`` when the probe printed no version: the commands then use what
        every supported release accepts. The probe is not in :attr:`command_counts`: it is
        answered by the client binary, with no RPC to the controller.

        :raises UnsupportedSlurmVersion: the release is older than the minimum supported.
        """
        if not self._version_known:
            self.version_probes += 1
            status, out, _err = self.exec_bytes(commands.to_shell(commands.slurm_version()))
            self._features = read_probe(status, out.decode("utf-8", "replace"))
            self._version_known = True
            if self._features is None:
                self.log.warning("Could not read the Slurm version on %s (scontrol --version exited %d); "
                                 "using what every supported release accepts", self.address, status)
        return self._features

    def _drop_connection(self) -> None:
        self._version_known = False
        if self.__dict__.get("openssh") is not None:
            return  # the master outlives the hook on purpose: other tasks ride on it
        client = getattr(self.ssh_hook, "client", None)
        self.ssh_hook.client = None
        if client is not None:
            try:
                client.close()
            except Exception:
                self.log.debug("closing a broken SSH client failed", exc_info=True)

    def close(self) -> None:
        """Close the cached SSH connection."""
        if "ssh_hook" in self.__dict__:
            self._drop_connection()

    def exec_bytes(self, command: str, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run a shell command string on the login node; return ``(exit, stdout, stderr)``.

        :raises SlurmConnectionError: connecting failed or the connection dropped.
        :raises SlurmTimeoutError: the command ran longer than ``timeout``.
        """
        limit = self.cmd_timeout if timeout is None else timeout
        if self.openssh is not None:
            return self._openssh_call(self.openssh.exec, command, timeout=limit)
        client = self._client()
        try:
            transport = client.get_transport()
            channel = transport.open_session(timeout=self.conn_timeout or 30)
            channel.exec_command(command)
            channel.shutdown_write()
            out, err = io.BytesIO(), io.BytesIO()
            deadline = time.monotonic() + limit
            with selectors.DefaultSelector() as selector:
                selector.register(channel, selectors.EVENT_READ)
                while True:
                    while channel.recv_ready():
                        out.write(channel.recv(1 << 16))
                    while channel.recv_stderr_ready():
                        err.write(channel.recv_stderr(1 << 16))
                    # The exit status can come before the last of stdout: sshd reports the exit
                    # as soon as the child is reaped while output it holds still waits for window
                    # space (a 30 MB read lost up to 50 kB in half the tries). Only the EOF after
                    # the exit status says everything came.
                    if (channel.exit_status_ready() and channel.eof_received
                            and not channel.recv_ready() and not channel.recv_stderr_ready()):
                        break
                    if channel.closed and not channel.exit_status_ready():
                        raise EOFError("channel closed before the command finished")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        channel.close()
                        raise SlurmTimeoutError(
                            f"command on {self.address} did not finish within {limit:.0f}s: {command[:200]}"
                        )
                    selector.select(min(remaining, 1.0))
            status = channel.recv_exit_status()
            channel.close()
            return status, out.getvalue(), err.getvalue()
        except SlurmConnectionError:
            raise
        except Exception as exc:
            # paramiko raises SSHException, EOFError, socket errors...: all mean "the connection
            # is unusable", and the command may or may not have run.
            self._drop_connection()
            raise SlurmConnectionError(
                f"connection to {self.address} failed while running a command: {type(exc).__name__}: {exc}"
            ) from exc

    def _openssh_call(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except SlurmConnectionError:
            self._version_known = False  # the next connection may reach another login node
            raise

    def run(self, argv: Sequence[str] | str, timeout: float | None = None) -> CommandResult:
        """Run an argv (quoted with :func:`slurmflow.commands.to_shell`) or a prepared command."""
        if isinstance(argv, str):
            command, tool = argv, argv.split(" ", 1)[0]
        else:
            command, tool = commands.to_shell(argv), str(argv[0])
        self.command_counts[tool] += 1
        status, out, err = self.exec_bytes(command, timeout=timeout)
        return CommandResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def check(self, argv: Sequence[str], timeout: float | None = None) -> str:
        """Run and return stdout; a non-zero exit raises :class:`SlurmCommandError`."""
        result = self.run(argv, timeout=timeout)
        if result.exit_code != 0:
            raise SlurmCommandError(str(argv[0]), result.exit_code, result.stderr or result.stdout)
        return result.stdout

    # --- files ------------------------------------------------------------------------------

    @cached_property
    def home(self) -> str:
        home = self.check(commands.home_dir()).strip()
        if not home.startswith("/"):
            raise SlurmCommandError("printenv", 0, f"HOME on the login node is {home!r}, not a path")
        return home

    @property
    def job_root(self) -> str:
        """Where job directories go: argument, connection extra ``job_root``, or ``$HOME/slurmflow-jobs``."""
        root = self._job_root
        if not root:
            try:
                root = self.get_connection(self.slurm_conn_id).extra_dejson.get("job_root")
            except Exception:
                root = None
        root = root or "~/slurmflow-jobs"
        if root == "~" or root.startswith("~/"):
            root = self.home + root[1:]
        if not root.startswith("/"):
            root = posixpath.join(self.home, root)
        return posixpath.normpath(root)

    def make_dirs(self, paths: Sequence[str]) -> None:
        self.check(commands.mkdir(*paths))

    def upload(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write a file over SFTP; the mode is set *before* any content is written."""
        data = content.encode() if isinstance(content, str) else content
        if self.openssh is not None:
            return self._openssh_call(self.openssh.upload, path, data, mode, timeout=self.cmd_timeout)
        client = self._client()
        try:
            with client.open_sftp() as sftp:
                with sftp.open(path, "w") as handle:
                    handle.chmod(mode)
                    handle.write(data)
        except Exception as exc:
            self._drop_connection()
            raise SlurmConnectionError(f"SFTP upload of {path} to {self.address} failed: {exc}") from exc

    def download(self, remote: str, local: Path) -> bool:
        """Copy a file or a directory tree from the cluster over SFTP; ``False`` when it does not exist."""
        if self.openssh is not None:
            return self._openssh_call(self.openssh.download, remote, local, timeout=self.cmd_timeout)
        client = self._client()
        try:
            with client.open_sftp() as sftp:
                try:
                    _download(sftp, remote, local)
                except FileNotFoundError:
                    return False
        except OSError as exc:
            self._drop_connection()
            raise SlurmConnectionError(f"SFTP download of {remote} from {self.address} failed: {exc}") from exc
        return True

    def download_matching(self, root: str, patterns: Sequence[str], local: Path) -> list[Path]:
        """Copy what under ``root`` matches ``patterns`` (files or whole folders; see
        :func:`slurmflow.commands.pack_matching`) into ``local``, keeping the layout, in one round
        trip (a tar stream over the SSH channel); what is missing is skipped.

        :return: the local paths of the top-level entries that came (``local/trial-3``, ``local/result.json``).
        :raises SlurmCommandError: ``root`` is missing or the archive could not be made.
        """
        import tarfile

        status, out, err = self.exec_bytes(commands.pack_matching(root, patterns))
        if status != 0:
            raise SlurmCommandError("tar", status, err.decode("utf-8", "replace"))
        local.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(out), mode="r:gz") as archive:
            members = archive.getmembers()
            # "data" refuses absolute paths, links out of the tree and device files
            archive.extractall(local, filter="data")
        return sorted({local / Path(m.name).parts[0] for m in members if Path(m.name).parts})

    def max_array_size(self) -> int:
        """The controller's ``MaxArraySize`` (array indices must stay below it)."""
        from slurmflow.parsing import parse_config_value

        return int(parse_config_value(self.check(commands.scontrol_show_config()), "MaxArraySize"))

    def remove(self, path: str) -> None:
        """Delete one file (``rm -f``); directories are left alone (see :meth:`remove_tree`)."""
        self.run(["rm", "-f", "--", path])

    def remove_tree(self, path: str) -> None:
        """Delete a directory tree, but only strictly inside :attr:`job_root` (a guard against
        a bad path turning into ``rm -rf`` of a home directory).

        :raises ValueError: the path is not below the job root.
        """
        root = self.job_root.rstrip("/") + "/"
        target = posixpath.normpath(path)
        if not target.startswith(root) or target.rstrip("/") + "/" == root:
            raise ValueError(f"refusing to delete {path!r}: not inside the job root {self.job_root}")
        self.check(["rm", "-rf", "--", target])

    # --- jobs -------------------------------------------------------------------------------

    def get_states(self, job_ids: Sequence[str], expected_tasks: dict[str, int] | None = None) -> dict[str, JobSnapshot]:
        """State of each job: one squeue, plus one sacct when some finished (see :mod:`slurmflow.status`)."""
        options = ResolveOptions(accounting=self.accounting, expected_tasks=expected_tasks or {},
                                 features=self.features)
        result = run_sync(resolve_states(job_ids, options), self.run)
        self.accounting = options.accounting
        return result

    def find_jobs(self, key: JobKey, generation: int) -> dict[str, JobSnapshot]:
        """Every job of ``key`` (this and earlier generations) that squeue or sacct knows."""
        names = key.candidate_names(generation)
        return run_sync(lookup_key(names, since=self.lookup_since, accounting=self.accounting,
                                   features=self.features), self.run)

    def usage(self, job_ids: Sequence[str]) -> dict[str, JobUsage]:
        """What jobs used, from accounting, in one ``sacct`` for all of them.

        An array's id gives every task that started (``123_0``, ``123_1``...; fold them with
        :func:`slurmflow.usage.summarize`); a job accounting does not know is simply absent.
        Accounting lags the controller by a moment after a job ends: check
        :attr:`JobUsage.state` before taking the figures as final.

        :param job_ids: job ids, array ids or array task ids (``123_4``).
        :return: per job id as Slurm prints it (``123``, ``123_4``).
        :raises SlurmCommandError: sacct failed (e.g. accounting storage is disabled).
        """
        if not job_ids:
            return {}
        return parse_usage(self.check(commands.sacct_usage(job_ids)))

    def cancel(self, job_ids: Sequence[str], signal: str | None = None) -> None:
        """``scancel``; cancelling a job that already ended is not an error."""
        if not job_ids:
            return
        result = self.run(commands.scancel(job_ids, signal=signal))
        if result.exit_code != 0 and not any(m in result.stderr for m in _ALREADY_DONE):
            raise SlurmCommandError("scancel", result.exit_code, result.stderr)

    def test_only(self, script_path: str) -> str:
        """``sbatch --test-only``: Slurm's verdict on partition/account/QOS/GRES without submitting.

        :return: Slurm's message (e.g. ``Job 12 to start at ... on nodes x in partition debug``).
        :raises SlurmSubmitError: the job would be rejected.
        :raises SlurmCommandError: the controller did not answer (try again later).
        """
        result = self.run(commands.sbatch_test_only(script_path))
        message = (result.stderr or result.stdout).strip()
        if result.exit_code != 0:
            error = SlurmCommandError if any(m in message for m in _TRANSIENT_SBATCH) else SlurmSubmitError
            raise error("sbatch --test-only", result.exit_code, message)
        return message

    def read_logs(self, reads: Sequence[LogRead]) -> list[LogChunk]:
        """Read many log files from offsets in one command (no Slurm RPC)."""
        if not reads:
            return []
        command, boundary = read_logs_command(reads)
        self.command_counts["sh"] += 1
        status, out, err = self.exec_bytes(command)
        if status != 0:
            raise SlurmCommandError("log read", status, err.decode("utf-8", "replace"))
        return parse_read_logs(reads, out, boundary)

    def tail(self, path: str, nbytes: int = DEFAULT_TAIL_BYTES) -> bytes:
        return self.read_logs([LogRead(path, -1, nbytes)])[0].data

    def stage(self, script: SbatchScript, script_text: str, secrets_text: str | None) -> None:
        """Create the job directory and upload the script (and the mode-600 secrets file)."""
        self.make_dirs(script.directories)
        if script.secrets_path and secrets_text is not None:
            self.upload(script.secrets_path, secrets_text, mode=0o600)
        self.upload(script.script_path, script_text, mode=0o700)

    def submit(
        self,
        key: JobKey,
        generation: int,
        script: SbatchScript,
        script_text: str,
        secrets_text: str | None = None,
        *,
        retry_wait: float = 3.0,
    ) -> SubmitOutcome:
        """Submit exactly once for ``(key, generation)``.

        1. Look the key up (squeue + sacct by job name) and :func:`slurmflow.identity.decide`:
           attach to a live job, reuse a COMPLETED one, or submit (cancelling live jobs of an
           earlier generation first).
        2. Submit under ``flock``, re-checking squeue for a live job of the same name.
        3. After an ambiguous failure (timeout, dropped connection, controller not answering),
           look the key up again before trying again: a job that appeared is ours.

        :raises SlurmSubmitError: sbatch rejected the job (no retry can help).
        :raises SlurmConnectionError: the login node stayed unreachable.
        """
        found = self.find_jobs(key, generation)
        decision = decide(generation, self._existing(found))
        self.log.info("Slurm exactly-once check for %s: %s", key.job_name(generation), decision.reason)
        if decision.cancel:
            self.log.warning("Cancelling jobs of an earlier clear of this task: %s", ", ".join(decision.cancel))
            self.cancel(decision.cancel)
        if decision.action == "attach":
            return SubmitOutcome(decision.job_id or "", "attached", decision.cancel, decision.reason)
        if decision.action == "reuse":
            return SubmitOutcome(decision.job_id or "", "reused", decision.cancel, decision.reason)

        known = set(found)
        last_error: Exception | None = None
        for attempt in range(1, self.submit_attempts + 1):
            if attempt > 1:
                # An unclear failure: did the previous attempt create the job after all?
                time.sleep(retry_wait * (attempt - 1))
                try:
                    again = self.find_jobs(key, generation)
                except (SlurmConnectionError, SlurmCommandError) as exc:
                    last_error = exc
                    self.log.warning("Lookup after a failed submission failed too: %s", exc)
                    continue
                new = [j for j in again if j not in known and parse_job_name(again[j].name)]
                if new:
                    job_id = max(new, key=int)
                    self.log.info("Job %s was submitted despite the error; attaching to it", job_id)
                    return SubmitOutcome(job_id, "attached", decision.cancel, "found after an unclear sbatch failure")
            try:
                self.stage(script, script_text, secrets_text)
                result = self.run(commands.submit_once(script.job_dir, script.script_path, script.job_name,
                                                           self.features))
            except SlurmConnectionError as exc:
                last_error = exc
                self.log.warning("Submission attempt %d/%d failed: %s", attempt, self.submit_attempts, exc)
                continue
            if result.exit_code == 0:
                job_id, existed = commands.parse_submit_once(result.stdout)
                action: Literal["submitted", "attached"] = "attached" if existed else "submitted"
                self.log.info("Slurm job %s %s (%s)", job_id, action, script.job_name)
                return SubmitOutcome(job_id, action, decision.cancel, decision.reason)
            message = (result.stderr or result.stdout).strip()
            if any(m in message for m in _TRANSIENT_SBATCH):
                last_error = SlurmCommandError("sbatch", result.exit_code, message)
                self.log.warning("sbatch attempt %d/%d: controller busy: %s", attempt, self.submit_attempts, message)
                continue
            raise SlurmSubmitError("sbatch", result.exit_code, message or "no message")
        raise SlurmConnectionError(
            f"could not submit {script.job_name} after {self.submit_attempts} attempts: {last_error}"
        )

    @staticmethod
    def _existing(found: dict[str, JobSnapshot]) -> list[ExistingJob]:
        jobs = []
        for job_id, snap in found.items():
            parsed = parse_job_name(snap.name)
            if parsed is not None:
                jobs.append(ExistingJob(job_id, parsed[1], snap.state))
        return jobs


def _download(sftp: Any, remote: str, local: Path) -> None:
    attrs = sftp.stat(remote)
    if stat.S_ISDIR(attrs.st_mode):
        local.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(remote):
            _download(sftp, posixpath.join(remote, entry.filename), local / entry.filename)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        sftp.get(remote, str(local))


class SlurmAsyncHook(BaseHook):
    """The async side: one asyncssh connection to the login node, reused for every command.

    Built on the ssh provider's ``SSHHookAsync`` (same connection id and extras); used by the
    triggerer's shared poller.

    :param slurm_conn_id: the SSH connection of the login node.
    :param cmd_timeout: seconds one remote command may take.
    :param conn_timeout: seconds to establish the connection (asyncssh has no default limit).
    """

    conn_name_attr = "slurm_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "ssh"
    hook_name = "Slurm (SSH, async)"

    def __init__(self, slurm_conn_id: str = default_conn_name, *, cmd_timeout: float = 60.0, conn_timeout: float = 20.0):
        super().__init__()
        self.slurm_conn_id = slurm_conn_id
        self.cmd_timeout = cmd_timeout
        self.conn_timeout = conn_timeout
        self._conn: Any = None
        #: The OpenSSH transport, once the connection was read and chose it.
        self._openssh: AsyncOpenSSHTransport | None = None
        self._transport_known = False
        self._lock = asyncio.Lock()
        self.command_counts: Counter[str] = Counter()
        self.connects = 0
        self._features: SlurmFeatures | None = None
        self._version_known = False
        self.version_probes = 0

    @cached_property
    def ssh_hook(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        return SSHHookAsync(ssh_conn_id=self.slurm_conn_id)

    async def _connection(self) -> Any:
        async with self._lock:
            if self._conn is not None and (self._openssh is not None or not self._conn.is_closed()):
                return self._conn
            try:
                if await self._open_openssh():
                    return self._conn
                async with asyncio.timeout(self.conn_timeout):
                    self._conn = await self.ssh_hook.get_conn()
            except SlurmConnectionError:
                self._conn = None
                raise
            except Exception as exc:
                self._conn = None
                raise SlurmConnectionError(
                    f"cannot connect to the Slurm login node (connection {self.slurm_conn_id!r}): "
                    f"{type(exc).__name__}: {exc or 'timed out'}"
                ) from exc
            self.connects += 1
            self._version_known = False  # a new connection: probe its release again
            return self._conn

    async def _open_openssh(self) -> bool:
        """Use the OpenSSH transport if the connection says so (``True``); then ``_conn`` is it.
        Its errors (no master, expired certificate) pass as they are: they name the fix."""
        if not self._transport_known:
            from airflow.providers.common.compat.connection import get_async_connection

            settings = _openssh_settings(await get_async_connection(self.slurm_conn_id))
            # One try per round: the poller's rounds are the retries (its failure_limit).
            self._openssh = AsyncOpenSSHTransport(settings, connect_patience=0) if settings else None
            self._transport_known = True
        if self._openssh is None:
            return False
        if not self._openssh.ready:
            await self._openssh.ensure_ready()
            self.connects += 1
            self._version_known = False
        self._conn = self._openssh
        return True

    async def exec_bytes(self, command: str, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run a shell command string; ``(exit, stdout, stderr)`` as bytes.

        :raises SlurmConnectionError: connecting failed or the connection dropped.
        :raises SlurmTimeoutError: the command ran too long.
        """
        conn = await self._connection()
        limit = self.cmd_timeout if timeout is None else timeout
        if conn is self._openssh:
            try:
                return await self._openssh.exec(command, timeout=limit)
            except SlurmConnectionError:
                self._conn = None  # reconnect, and probe the release again
                raise
        try:
            async with asyncio.timeout(limit):
                result = await conn.run(command, check=False, encoding=None)
        except TimeoutError as exc:
            raise SlurmTimeoutError(f"command did not finish within {limit:.0f}s: {command[:200]}") from exc
        except Exception as exc:
            await self.close()
            raise SlurmConnectionError(
                f"connection {self.slurm_conn_id!r} failed while running a command: {type(exc).__name__}: {exc}"
            ) from exc
        status = result.exit_status if result.exit_status is not None else 255
        return status, result.stdout or b"", result.stderr or b""

    async def run(self, argv: Sequence[str]) -> CommandResult:
        """Run an argv; a dropped connection is re-opened once (every command sent this way -
        squeue, sacct, scontrol, scancel - is idempotent)."""
        self.command_counts[str(argv[0])] += 1
        command = commands.to_shell(argv)
        try:
            status, out, err = await self.exec_bytes(command)
        except SlurmTimeoutError:
            raise
        except SlurmConnectionError as exc:
            self.log.info("Reconnecting to the Slurm login node after: %s", exc)
            status, out, err = await self.exec_bytes(command)
        return CommandResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    async def features(self) -> SlurmFeatures | None:
        """As :attr:`SlurmHook.features`: one ``scontrol --version`` per connection.

        :raises UnsupportedSlurmVersion: the release is older than the minimum supported.
        """
        if not self._version_known:
            self.version_probes += 1
            status, out, _err = await self.exec_bytes(commands.to_shell(commands.slurm_version()))
            self._features = read_probe(status, out.decode("utf-8", "replace"))
            self._version_known = True
            if self._features is None:
                self.log.warning("Could not read the Slurm version over %r (scontrol --version exited %d); "
                                 "using what every supported release accepts", self.slurm_conn_id, status)
        return self._features

    async def get_states(self, job_ids: Sequence[str], options: ResolveOptions) -> dict[str, JobSnapshot]:
        options.features = await self.features()
        return await run_async(resolve_states(job_ids, options), self.run)

    async def read_logs(self, reads: Sequence[LogRead]) -> list[LogChunk]:
        if not reads:
            return []
        command, boundary = read_logs_command(reads)
        self.command_counts["sh"] += 1
        status, out, err = await self.exec_bytes(command)
        if status != 0:
            raise SlurmCommandError("log read", status, err.decode("utf-8", "replace"))
        return parse_read_logs(reads, out, boundary)

    async def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            split_job_id(job_id)
        result = await self.run(commands.scancel(job_ids))
        if result.exit_code != 0 and not any(m in result.stderr for m in _ALREADY_DONE):
            raise SlurmCommandError("scancel", result.exit_code, result.stderr)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn is not self._openssh:  # a master outlives the poller
            try:
                conn.close()
                await asyncio.wait_for(conn.wait_closed(), timeout=5)
            except Exception:
                self.log.debug("closing the asyncssh connection failed", exc_info=True)


def _openssh_settings(conn: Any) -> OpenSSHSettings | None:
    """Settings of the OpenSSH transport when ``conn`` chooses it (extra ``transport``)."""
    if conn is None:
        return None
    extra = conn.extra_dejson
    if not uses_openssh(extra):
        return None
    return OpenSSHSettings.from_connection(conn.host, conn.port, conn.login, extra)
