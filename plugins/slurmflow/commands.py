"""Shell command builders for the login node: squeue, sacct, scontrol, sbatch, scancel, files.

Pure module, like the ssh provider's ``utils/remote_job.py``: every builder returns an argv
list, and :func:`to_shell` joins it with ``shlex.quote`` so no value is ever interpreted by
the remote shell. The few commands that need shell logic (atomic submit, batched log reads)
are POSIX ``sh -c`` scripts whose variable parts are quoted the same way.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Iterable, Sequence

from slurmflow.parsing import SACCT_FIELDS, SQUEUE_FIELDS, split_job_id
from slurmflow.states import SlurmState
from slurmflow.usage import USAGE_FIELDS
from slurmflow.versions import GATED_STATES, SlurmFeatures

#: States squeue is asked for when looking for a *live* job with our name (PREEMPTED is not one:
#: the controller shows it only for a preempted job it did not requeue), on every supported
#: release; :func:`live_states` adds the ones a given release also knows.
LIVE_STATES: tuple[str, ...] = tuple(
    s.value for s in SlurmState if s.is_live_in_controller and s.value not in GATED_STATES
)
#: The commands that cost the Slurm controller (or slurmdbd) an RPC; the rest are file I/O.
SLURM_QUERY_TOOLS = frozenset({"squeue", "sacct", "scontrol", "sbatch", "scancel"})
SUBMITTED_MARK = "SLURMFLOW_SUBMITTED"
EXISTING_MARK = "SLURMFLOW_EXISTING"


def to_shell(argv: Sequence[str]) -> str:
    """Join an argv for a remote shell, quoting every element."""
    return shlex.join(str(a) for a in argv)


def live_states(features: SlurmFeatures | None = None) -> tuple[str, ...]:
    """The live states to ask squeue for: squeue exits on a state name its release does not
    know ("Invalid job state specified"), so a release-gated name goes in only where it exists.
    ``None`` (version unknown): the names every supported release knows."""
    if features is None:
        return LIVE_STATES
    return tuple(
        s.value for s in SlurmState
        if s.is_live_in_controller and (s.value not in GATED_STATES or features.has(GATED_STATES[s.value]))
    )


def _ids(job_ids: Iterable[str]) -> str:
    # split_job_id raises on anything that is not a job id, so nothing else reaches the shell.
    ids = sorted({str(j).strip() for j in job_ids}, key=_id_sort_key)
    if not ids:
        raise ValueError("no job ids given")
    return ",".join(ids)


def _id_sort_key(job_id: str) -> tuple[int, int]:
    base, task = split_job_id(job_id)
    return int(base), -1 if task is None else task


def _squeue_format() -> str:
    # Every field ends with "|": widths keep long names whole, the suffix is our delimiter
    # (squeue's --Format has no separator option of its own).
    widths = {"Name": 300, "Reason": 120, "NodeList": 200}
    return ",".join(f"{f}:{widths.get(f, 40)}|" for f in SQUEUE_FIELDS)


def squeue_jobs(job_ids: Iterable[str]) -> list[str]:
    """squeue for given jobs, array tasks one per line, finished ones too (until MinJobAge)."""
    return [
        "squeue",
        "--noheader",
        "--array",
        "--states=all",
        f"--jobs={_ids(job_ids)}",
        f"--Format={_squeue_format()}",
    ]


def squeue_by_name(names: Sequence[str]) -> list[str]:
    """squeue for the caller's jobs with any of the given names (any state still in memory)."""
    return [
        "squeue",
        "--noheader",
        "--array",
        "--me",
        "--states=all",
        f"--name={','.join(names)}",
        f"--Format={_squeue_format()}",
    ]


def sacct_jobs(job_ids: Iterable[str]) -> list[str]:
    """sacct for given jobs: allocations only, one line per requeue (restart count)."""
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        "--duplicates",
        f"--jobs={_ids(job_ids)}",
        f"--format={','.join(SACCT_FIELDS)}",
    ]


def sacct_by_name(names: Sequence[str], since: str = "now-30days") -> list[str]:
    """sacct for the caller's jobs with any of the given names since ``since``."""
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        "--duplicates",
        f"--starttime={since}",
        f"--name={','.join(names)}",
        f"--format={','.join(SACCT_FIELDS)}",
    ]


def sacct_usage(job_ids: Iterable[str]) -> list[str]:
    """sacct for what jobs used (:mod:`slurmflow.usage`): job and step lines, one job line per
    run of a requeued job (every run used the cluster)."""
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--duplicates",
        f"--jobs={_ids(job_ids)}",
        f"--format={','.join(USAGE_FIELDS)}",
    ]


def scontrol_show_job(job_id: str | None = None) -> list[str]:
    """``scontrol --oneliner show job [ID]`` (all jobs still in memory when no id)."""
    argv = ["scontrol", "--oneliner", "show", "job"]
    if job_id is not None:
        argv.append(_ids([job_id]))
    return argv


def scancel(job_ids: Iterable[str], signal: str | None = None) -> list[str]:
    """``scancel`` for jobs (an array id cancels every task of the array)."""
    argv = ["scancel"]
    if signal:
        argv.append(f"--signal={signal}")
    argv.extend(_ids(job_ids).split(","))
    return argv


def sbatch_test_only(script_path: str) -> list[str]:
    return ["sbatch", "--test-only", script_path]


def slurm_version() -> list[str]:
    """``scontrol --version`` (``slurm 22.05.8``): the client tools' release, printed by the
    binary itself (no RPC to the controller); see :mod:`slurmflow.versions`."""
    return ["scontrol", "--version"]


def scontrol_show_config() -> list[str]:
    """The controller's configuration (``MaxArraySize``, ``MaxJobCount``...), one ``Key = Value`` a line."""
    return ["scontrol", "show", "config"]


def pack_matching(root: str, patterns: Sequence[str]) -> str:
    """A gzipped tar on stdout of what under ``root`` matches one of ``patterns`` (``find -path``
    globs relative to ``root``: ``result.json``, ``trial-*/result.json``); a matching directory
    comes whole. One round trip for any number of files, where SFTP takes several per file.

    ``find`` does the matching (no shell globbing of our values, which are quoted); what does not
    exist is simply not in the archive.
    """
    if not patterns:
        raise ValueError("no file patterns given")
    tests: list[str] = []
    for pattern in patterns:
        if pattern.startswith("/") or ".." in pattern.split("/"):
            raise ValueError(f"a pattern is relative to the root and stays below it: {pattern!r}")
        tests += (["-o"] if tests else []) + ["-path", f"./{pattern}"]
    depth = str(max(p.count("/") + 1 for p in patterns))
    find = to_shell(["find", ".", "-mindepth", "1", "-maxdepth", depth, "(", *tests, ")", "-print0"])
    return f"cd {shlex.quote(root)} && {find} | tar --null -T - -czf -"


def mkdir(*paths: str) -> list[str]:
    # Only the last components get 700; parents keep the user's umask (they hold no secrets).
    return ["mkdir", "-p", "-m", "700", "--", *paths]


def home_dir() -> list[str]:
    return ["printenv", "HOME"]


def submit_once(job_dir: str, script_path: str, job_name: str, features: SlurmFeatures | None = None) -> str:
    """Submit under a lock, unless a live job with this name already exists.

    The lookup before submission happens in Python; this closes the remaining race (two
    submitters for one key at once, e.g. a zombie task and its retry) on the login node:
    ``flock`` serialises submitters of one job directory and squeue, being answered from
    slurmctld's memory, sees a job the moment sbatch returns.

    Prints ``SLURMFLOW_EXISTING <id>`` or ``SLURMFLOW_SUBMITTED <id>[;cluster]``.

    :param features: the login node's release (:func:`live_states`); ``None``: unknown.
    """
    states = ",".join(live_states(features))
    body = (
        "set -e; "
        'cd -- "$1"; '
        "exec 9>>.slurmflow-submit.lock; "
        "flock -w 60 9; "
        f'live=$(squeue --noheader --me --states={states} --name="$3" --format=%A); '
        "set -- \"$1\" \"$2\" \"$3\" $live; "
        f'if [ "$#" -gt 3 ]; then echo "{EXISTING_MARK} $4"; exit 0; fi; '
        'out=$(sbatch --parsable -- "$2"); '
        f'echo "{SUBMITTED_MARK} $out"'
    )
    return to_shell(["sh", "-c", body, "slurmflow-submit", job_dir, script_path, job_name])


def parse_submit_once(stdout: str) -> tuple[str, bool]:
    """``(job_id, already_existed)`` from :func:`submit_once`'s output.

    :raises ValueError: when neither mark is present.
    """
    from slurmflow.parsing import SlurmParseError, parse_sbatch_parsable

    for line in stdout.splitlines():
        mark, _, rest = line.strip().partition(" ")
        if mark == EXISTING_MARK:
            return split_job_id(rest.strip())[0], True
        if mark == SUBMITTED_MARK:
            return parse_sbatch_parsable(rest), False
    raise SlurmParseError(f"submission printed no job id: {stdout.strip()!r}")


def new_boundary() -> str:
    return f"@@SLURMFLOW-END-{secrets.token_hex(8)}@@"
