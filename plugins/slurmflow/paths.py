"""Where one job's files live on the cluster: the one place the job directory's layout is written.

Pure module, in the spirit of the ssh provider's ``RemoteJobPaths``: the operator stages the
script and the secrets file here, the wait engine follows and tails the log here, and the
pipeline collects the result from here.

``<job_dir>/``
    ``job.sbatch``    the batch script (no secret in it)
    ``.slurmflow-secrets.env`` mode 600, sourced by the script, deleted when the job is over
    ``result.json``   what the training wrote (schema in training/README.md)
    ``slurm-<id>.out`` the job's output, unless ``--output`` says otherwise
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SCRIPT_FILE_NAME = "job.sbatch"
SECRETS_FILE_NAME = ".slurmflow-secrets.env"
RESULT_FILE_NAME = "result.json"


@dataclass(frozen=True)
class JobPaths:
    """One job's files.

    :param job_dir: the per-run job directory (absolute).
    :param output: the ``--output`` pattern, absolute, Slurm placeholders unexpanded.
    :param user: the cluster user (for ``%u``).
    :param job_name: the job name (for ``%x``).
    """

    job_dir: str
    output: str
    user: str = ""
    job_name: str = ""

    @classmethod
    def for_log(cls, output: str, user: str = "", job_name: str = "") -> JobPaths:
        """Paths of a job known only by its log (a sensor watching someone else's job)."""
        return cls(job_dir=posixpath.dirname(output), output=output, user=user, job_name=job_name)

    @property
    def script(self) -> str:
        return f"{self.job_dir}/{SCRIPT_FILE_NAME}"

    @property
    def secrets(self) -> str:
        return f"{self.job_dir}/{SECRETS_FILE_NAME}"

    @property
    def result(self) -> str:
        return f"{self.job_dir}/{RESULT_FILE_NAME}"

    def log(self, job_id: str, array_task: int | None = None, job_name: str = "") -> str | None:
        """The output file of a job (or array task); ``None`` when the pattern uses a placeholder
        only the node knows (``%N``, ``%t``...). ``job_name`` fills ``%x`` when not known here."""
        return expand_log_path(self.output, job_id, array_task, user=self.user,
                               job_name=self.job_name or job_name)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobPaths:
        return cls(job_dir=str(data["job_dir"]), output=str(data["output"]), user=str(data.get("user", "")),
                   job_name=str(data.get("job_name", "")))


def expand_log_path(pattern: str, job_id: str, array_task: int | None = None, *, user: str = "",
                    job_name: str = "") -> str | None:
    """Expand Slurm filename placeholders we can know from outside the job.

    Supports ``%%``, ``%j``, ``%A``, ``%a``, ``%x``, ``%u`` (with optional zero-padding such as
    ``%4a``). Returns ``None`` when the pattern uses placeholders only the node knows (``%N``,
    ``%t``, ``%s``...), in which case logs cannot be streamed.

    :param pattern: the ``--output`` pattern.
    :param job_id: the job id (for arrays: the array job id; the task's own id is unknown here).
    :param array_task: the array task index, for arrays.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        match = re.match(r"%(\d*)([%jAaxu])", pattern[i:])
        if not match:
            return None
        width, code = match.group(1), match.group(2)
        if code == "%":
            value = "%"
        elif code in "jA":
            # For a plain job %A is the job id too; for an array task %j is the task's own job
            # id, which we do not track: such patterns cannot be expanded.
            if code == "j" and array_task is not None:
                return None
            value = job_id
        elif code == "a":
            value = str(array_task) if array_task is not None else "4294967294"
        elif code == "x":
            value = job_name
        else:
            value = user
        if width and code in "jAa":
            value = value.zfill(int(width))
        out.append(value)
        i += len(match.group(0))
    return "".join(out)
