"""Errors of the Slurm layer. Pure module: the operators map them to Airflow exceptions.

Each message names the cause (host, command, Slurm's own words) so a failed task says why.
"""

from __future__ import annotations


class SlurmError(Exception):
    """Base class of everything this package raises about Slurm."""


class SlurmConnectionError(SlurmError):
    """The login node could not be reached, refused us, or the connection dropped.

    Ambiguous for a submission: the command may or may not have run.
    """


class SlurmTimeoutError(SlurmConnectionError):
    """A remote command did not finish in time (ambiguous, like a dropped connection)."""


class SlurmCommandError(SlurmError):
    """A Slurm command ran and failed; the message names the command and quotes its error.

    :param tool: the command (``squeue``, ``sbatch``...).
    :param exit_code: its exit status.
    :param stderr: what it printed on stderr (or stdout when stderr was empty).
    """

    def __init__(self, tool: str, exit_code: int, stderr: str, hint: str = ""):
        self.tool = tool
        self.exit_code = exit_code
        self.stderr = stderr.strip()
        detail = self.stderr or f"exit code {exit_code}"
        super().__init__(f"{tool} failed (exit {exit_code}): {detail}{hint}")


class SlurmSubmitError(SlurmCommandError):
    """sbatch rejected the job (bad partition, account, QOS, resources...): retrying cannot help."""


class SlurmJobNotFoundError(SlurmError):
    """The job id is known to neither squeue, sacct nor scontrol."""


class SSHReauthRequired(SlurmConnectionError):
    """Only a person can get us back onto the login node: the SSH master they opened (after MFA)
    is gone, the login was refused, or a certificate expired. Raised at once, never after a
    prompt or a wait; the message ends with what to run.

    :param reason: what went wrong.
    :param command: the command that fixes it (open the master again, renew the certificate).
    """

    def __init__(self, reason: str, command: str):
        self.reason = reason
        self.command = command
        super().__init__(f"{reason}. To log in again, run on the Airflow machine (as the user Airflow "
                         f"runs as): {command}")


class SSHCertificateExpired(SSHReauthRequired):
    """The SSH certificate is expired, not yet valid, or about to expire: renew it first."""
