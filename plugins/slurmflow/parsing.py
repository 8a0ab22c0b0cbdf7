"""Parsers for what Slurm's command-line tools print: squeue, sacct, scontrol, sbatch.

Pure module (no Airflow, no I/O). Each parser matches a command built in
:mod:`slurmflow.commands` (same field lists), and turns malformed output into
:class:`SlurmParseError` naming the offending line instead of guessing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from slurmflow.states import JobState, SlurmState, parse_exit_code
from slurmflow.versions import SlurmFeatures


class SlurmParseError(ValueError):
    """Slurm printed something we cannot read; the message quotes it."""


# --- field lists (shared with slurmflow.commands) -------------------------------------------------

#: ``squeue --Format`` fields, each printed as ``value|`` (the ``|`` suffix is our delimiter).
SQUEUE_FIELDS: tuple[str, ...] = (
    "JobID",
    "ArrayJobID",
    "ArrayTaskID",
    "Name",
    "State",
    "Reason",
    "exit_code",
    "RestartCnt",
    "NodeList",
    "TimeUsed",
)
#: ``sacct --format`` fields, printed with ``--parsable2`` (``|`` separated, no trailing ``|``).
SACCT_FIELDS: tuple[str, ...] = (
    "JobID",
    "JobIDRaw",
    "JobName",
    "State",
    "ExitCode",
    "Elapsed",
    "ElapsedRaw",
    "NodeList",
    "Reason",
    "Submit",
    "Start",
    "End",
)

_JOB_ID_RE = re.compile(r"^(?P<base>\d+)(?:_(?P<task>\d+|\[[^\]]*\]))?(?:\+(?P<het>\d+))?$")
_ARRAY_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


@dataclass(frozen=True)
class JobRecord:
    """One line of squeue/sacct/scontrol output: a job, or one task of a job array.

    :param job_id: the id as Slurm prints it (``123``, ``123_4``).
    :param base_id: the id of the job, or of the array the task belongs to (``123``).
    :param array_task: the array task index, ``None`` for a plain job.
    :param name: the job name.
    :param state: state, reason, exit code, signal and restart count.
    :param elapsed_seconds: run time so far, or total once finished.
    :param node_list: nodes the job ran on (``None`` / ``""`` before it started).
    :param source: which tool produced it: ``squeue``, ``sacct`` or ``scontrol``.
    :param ranged: expanded from one line that stood for several tasks (``123_[2-5%2]``): the
        state of the range, not the task's own record.
    """

    job_id: str
    base_id: str
    array_task: int | None
    name: str
    state: JobState
    elapsed_seconds: int | None = None
    node_list: str = ""
    start: str = ""
    end: str = ""
    source: str = ""
    ranged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "base_id": self.base_id,
            "array_task": self.array_task,
            "name": self.name,
            **self.state.to_dict(),
            "elapsed_seconds": self.elapsed_seconds,
            "node_list": self.node_list,
            "start": self.start,
            "end": self.end,
            "source": self.source,
        }


def split_job_id(job_id: str) -> tuple[str, int | None]:
    """``"123_4"`` -> ``("123", 4)``; ``"123"`` -> ``("123", None)``.

    :raises SlurmParseError: for anything that is not a Slurm job id.
    """
    match = _JOB_ID_RE.match(job_id.strip())
    if not match or (match.group("task") or "").startswith("["):
        raise SlurmParseError(f"not a job id: {job_id!r}")
    task = match.group("task")
    return match.group("base"), int(task) if task is not None else None


def expand_array_indices(spec: str) -> list[int]:
    """Expand an array expression (``0-9%2``, ``1,3,5-7``, ``0-15:4``, ``[2-4]``) to task indices.

    :raises SlurmParseError: on a malformed expression.
    """
    body = spec.strip().strip("[]").split("%", 1)[0]
    if not body:
        raise SlurmParseError(f"empty array expression: {spec!r}")
    indices: list[int] = []
    for part in body.split(","):
        match = _ARRAY_RANGE_RE.match(part.strip())
        if not match:
            raise SlurmParseError(f"malformed array expression {spec!r} at {part!r}")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        step = int(match.group(3) or 1)
        if stop < start or step < 1:
            raise SlurmParseError(f"malformed array range {part!r} in {spec!r}")
        indices.extend(range(start, stop + 1, step))
    return sorted(set(indices))


def parse_duration(text: str | None) -> int | None:
    """Slurm durations (``[D-]HH:MM:SS``, ``MM:SS``, ``M:SS.mmm``) in whole seconds.

    Blank, ``INVALID``, ``UNLIMITED`` and ``N/A`` give ``None``.
    """
    seconds = parse_duration_exact(text)
    return None if seconds is None else int(seconds)


def parse_duration_exact(text: str | None) -> float | None:
    """Like :func:`parse_duration`, keeping the fraction (``00:02.047`` -> ``2.047``).

    sacct's ``TotalCPU`` of a short job is mostly milliseconds: truncating it would make a
    2-second job's CPU efficiency wrong by half.
    """
    if text is None:
        return None
    raw = text.strip()
    if not raw or raw.upper() in {"INVALID", "UNLIMITED", "N/A", "NONE", "INFINITE"}:
        return None
    days = 0
    if "-" in raw:
        day_part, raw = raw.split("-", 1)
        if not day_part.isdigit():
            raise SlurmParseError(f"malformed duration: {text!r}")
        days = int(day_part)
    parts = raw.split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise SlurmParseError(f"malformed duration: {text!r}") from None
    if len(numbers) > 3:
        raise SlurmParseError(f"malformed duration: {text!r}")
    while len(numbers) < 3:
        numbers.insert(0, 0.0)
    hours, minutes, seconds = numbers
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def _expand_record(record: JobRecord, raw_id: str) -> list[JobRecord]:
    """A pending array prints as ``123_[5-9%2]``: one record per task, so tasks can be counted."""
    match = _JOB_ID_RE.match(raw_id)
    task = match.group("task") if match else None
    if not task or not task.startswith("["):
        return [record]
    return [
        replace(record, job_id=f"{record.base_id}_{index}", array_task=index, ranged=True)
        for index in expand_array_indices(task)
    ]


def _is_range(raw_id: str) -> bool:
    return "_[" in raw_id


def _base_and_task(raw_id: str, line: str) -> tuple[str, int | None]:
    match = _JOB_ID_RE.match(raw_id)
    if not match:
        raise SlurmParseError(f"unexpected job id {raw_id!r} in line {line!r}")
    task = match.group("task")
    return match.group("base"), int(task) if task and not task.startswith("[") else None


def _int_or_zero(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def parse_squeue(text: str, features: SlurmFeatures | None = None) -> list[JobRecord]:
    """Parse ``squeue --noheader --Format=<SQUEUE_FIELDS each with a | suffix>``.

    Array tasks appear one per line with ``--array``; the array job id for a plain job is
    ``N/A`` and its task id too.

    :param features: the release that printed it (``exit_code`` is ``EXIT:SIGNAL`` from 23.02,
        the raw wait status before); ``None``: told apart by its form.

    :raises SlurmParseError: when a line does not have the expected columns.
    """
    records: list[JobRecord] = []
    ranged: list[JobRecord] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split("|")]
        # The format ends every field with "|", so a good line splits into N + 1 parts.
        if len(cols) != len(SQUEUE_FIELDS) + 1 or cols[-1]:
            raise SlurmParseError(f"unexpected squeue line (wanted {len(SQUEUE_FIELDS)} fields): {line!r}")
        row = dict(zip(SQUEUE_FIELDS, cols, strict=False))
        array_job, array_task = row["ArrayJobID"], row["ArrayTaskID"]
        if array_job.isdigit() and array_task.isdigit():
            raw_id = f"{array_job}_{array_task}"
        elif array_job.isdigit() and array_task not in {"", "N/A"}:
            # Pending tasks not expanded (squeue without --array): "1-3%1" -> "9_[1-3%1]".
            raw_id = f"{array_job}_[{array_task}]"
        else:
            raw_id = row["JobID"]
        base, task = _base_and_task(raw_id, line)
        state, detail = SlurmState.parse(row["State"])
        if state is SlurmState.UNKNOWN and row["State"]:
            raise SlurmParseError(f"unknown job state {row['State']!r} in squeue line {line!r}")
        exit_code, signal = _squeue_exit(row["exit_code"], features, line)
        record = JobRecord(
            job_id=f"{base}_{task}" if task is not None else base,
            base_id=base,
            array_task=task,
            name=row["Name"],
            state=JobState(
                state=state,
                reason=row["Reason"] or detail,
                exit_code=exit_code if state.ends_run else None,
                signal=signal if state.ends_run else None,
                restarts=_int_or_zero(row["RestartCnt"]),
                # The controller shows PREEMPTED only for a job it did not requeue.
                ended=state is SlurmState.PREEMPTED,
            ),
            elapsed_seconds=parse_duration(row["TimeUsed"]),
            node_list=_clean_nodes(row["NodeList"]),
            source="squeue",
        )
        (ranged if _is_range(raw_id) else records).extend(_expand_record(record, raw_id))
    return _explicit_first(records, ranged)


def _explicit_first(explicit: list[JobRecord], ranged: list[JobRecord]) -> list[JobRecord]:
    """A range line ("9_[1-3%1]") stands for tasks that never started; when it also names
    tasks that have lines of their own (seen after a cancel), those lines win."""
    have = {r.job_id for r in explicit}
    return explicit + [r for r in ranged if r.job_id not in have]


def _squeue_exit(text: str, features: SlurmFeatures | None, line: str) -> tuple[int | None, int | None]:
    """Before 23.02 squeue's ``exit_code`` is the raw wait status (768 = exit 3, 15 = SIGTERM),
    decoded here the way ``WEXITSTATUS``/``WTERMSIG`` do; from 23.02 it is ``exit:signal`` like
    sacct's and scontrol's (``squeue_exit_code_pair`` in :mod:`slurmflow.versions`). A bare
    number is never a pair: with the release unknown the form tells them apart."""
    text = text.strip()
    pair = ":" in text if features is None else features.has("squeue_exit_code_pair")
    if pair:
        if text and ":" not in text:
            raise SlurmParseError(f"squeue exit_code {text!r} is not EXIT:SIGNAL in line {line!r}")
        return parse_exit_code(text)
    if not text or text.lstrip("-").isdigit() and text.startswith("-"):
        return None, None  # nothing yet; NO_VAL printed as a signed int
    if not text.isdigit():
        raise SlurmParseError(f"squeue exit_code {text!r} is not a wait status in line {line!r}")
    status = int(text)
    return (status >> 8) & 0xFF, status & 0x7F


def _clean_nodes(text: str) -> str:
    text = text.strip()
    return "" if text in {"", "None assigned", "(null)", "N/A"} else text


def parse_sacct(text: str) -> list[JobRecord]:
    """Parse ``sacct --noheader --parsable2 --allocations --duplicates --format=<SACCT_FIELDS>``.

    With ``--duplicates`` a requeued job prints one line per start; the last line is the
    current one and the number of earlier lines is its restart count. Earlier lines are
    ``REQUEUED`` (``scontrol requeue``) or ``PREEMPTED`` (Slurm requeued it on preemption); a
    ``PREEMPTED`` newest line is not marked ``ended`` here: only the controller's view can tell
    whether the job is back in the queue (:func:`slurmflow.status.resolve_states` folds both).

    :raises SlurmParseError: when a line does not have the expected columns.
    """
    by_id: dict[str, tuple[str, JobRecord]] = {}
    ranged: dict[str, JobRecord] = {}
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) != len(SACCT_FIELDS):
            raise SlurmParseError(f"unexpected sacct line (wanted {len(SACCT_FIELDS)} fields): {line!r}")
        row = dict(zip(SACCT_FIELDS, cols, strict=True))
        raw_id = row["JobID"].strip()
        if "." in raw_id:
            # A step (batch, extern, 0): --allocations should have hidden it; steps carry no
            # job-level state, so they are skipped rather than misread.
            continue
        base, task = _base_and_task(raw_id, line)
        state, detail = SlurmState.parse(row["State"])
        if state is SlurmState.UNKNOWN and row["State"].strip():
            raise SlurmParseError(f"unknown job state {row['State']!r} in sacct line {line!r}")
        exit_code, signal = parse_exit_code(row["ExitCode"])
        elapsed = row["ElapsedRaw"].strip()
        # sacct's Reason is the last reason the run waited in the queue (BeginTime after a
        # requeue, Resources, ...): a fact of a pending run, noise on one that started.
        reason = row["Reason"].strip() if state is SlurmState.PENDING else ""
        record = JobRecord(
            job_id=f"{base}_{task}" if task is not None else base,
            base_id=base,
            array_task=task,
            name=row["JobName"],
            state=JobState(
                state=state,
                reason=detail or ("" if reason == "None" else reason),
                exit_code=exit_code if state.ends_run else None,
                signal=signal if state.ends_run else None,
            ),
            elapsed_seconds=int(elapsed) if elapsed.isdigit() else parse_duration(row["Elapsed"]),
            node_list=_clean_nodes(row["NodeList"]),
            start=_clean_time(row["Start"]),
            end=_clean_time(row["End"]),
            source="sacct",
        )
        submitted = _clean_time(row["Submit"])
        if _is_range(raw_id):
            for rec in _expand_record(record, raw_id):
                ranged.setdefault(rec.job_id, rec)
            continue
        seen[record.job_id] = seen.get(record.job_id, 0) + 1
        current = by_id.get(record.job_id)
        # The newest submission is the current run; the earlier ones were requeued.
        if current is None or submitted >= current[0]:
            by_id[record.job_id] = (submitted, record)
    explicit = [replace(rec, state=replace(rec.state, restarts=seen[job_id] - 1)) for job_id, (_, rec) in by_id.items()]
    return _explicit_first(explicit, list(ranged.values()))


def _clean_time(text: str) -> str:
    text = text.strip()
    return "" if text in {"Unknown", "None", "N/A"} else text


_SCONTROL_PAIR_RE = re.compile(r"(\w[\w/:.]*)=(.*?)(?=\s+\w[\w/:.]*=|$)")


def parse_scontrol_jobs(text: str) -> list[JobRecord]:
    """Parse ``scontrol --oneliner show job`` (one ``Key=Value ...`` line per job or array task).

    ``No jobs in the system`` gives an empty list.

    :raises SlurmParseError: when a line lacks ``JobId`` or ``JobState``.
    """
    records: list[JobRecord] = []
    ranged: list[JobRecord] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("No jobs"):
            continue
        fields = {k: v.strip() for k, v in _SCONTROL_PAIR_RE.findall(line)}
        if "JobId" not in fields or "JobState" not in fields:
            raise SlurmParseError(f"unexpected scontrol line: {line!r}")
        task_text = fields.get("ArrayTaskId", "")
        if fields.get("ArrayJobId") and task_text.isdigit():
            raw_id = f"{fields['ArrayJobId']}_{task_text}"
        elif fields.get("ArrayJobId") and task_text:
            # Tasks not started yet are one record with a range ("1-3%1").
            raw_id = f"{fields['ArrayJobId']}_[{task_text}]"
        else:
            raw_id = fields["JobId"]
        base, task = _base_and_task(raw_id, line)
        state, detail = SlurmState.parse(fields["JobState"])
        exit_code, signal = parse_exit_code(fields.get("ExitCode"))
        reason = fields.get("Reason", "")
        record = JobRecord(
            job_id=f"{base}_{task}" if task is not None else base,
            base_id=base,
            array_task=task,
            name=fields.get("JobName", ""),
            state=JobState(
                state=state,
                reason=detail or ("" if reason == "None" else reason),
                exit_code=exit_code if state.ends_run else None,
                signal=signal if state.ends_run else None,
                restarts=_int_or_zero(fields.get("Restarts", "0")),
                ended=state is SlurmState.PREEMPTED,  # the controller's view, as for squeue
            ),
            elapsed_seconds=parse_duration(fields.get("RunTime")),
            node_list=_clean_nodes(fields.get("NodeList", "")),
            start=_clean_time(fields.get("StartTime", "")),
            end=_clean_time(fields.get("EndTime", "")),
            source="scontrol",
        )
        (ranged if _is_range(raw_id) else records).extend(_expand_record(record, raw_id))
    return _explicit_first(records, ranged)


_SBATCH_PARSABLE_RE = re.compile(r"^(\d+)(?:;([\w.-]+))?$")


def parse_config_value(text: str, key: str) -> str:
    """One value of ``scontrol show config`` output (``MaxArraySize             = 1001``).

    :raises SlurmParseError: the key is not there.
    """
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    raise SlurmParseError(f"{key} is not in the output of scontrol show config")


def parse_sbatch_parsable(text: str) -> str:
    """The job id from ``sbatch --parsable`` (``123`` or ``123;cluster``).

    :raises SlurmParseError: when the output holds no job id.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SlurmParseError("sbatch --parsable printed nothing")
    match = _SBATCH_PARSABLE_RE.match(lines[-1])
    if not match:
        raise SlurmParseError(f"sbatch --parsable printed {text.strip()!r}, not a job id")
    return match.group(1)


def group_by_job(records: Iterable[JobRecord]) -> dict[str, list[JobRecord]]:
    """Records per job (array tasks grouped under their array's id), in input order."""
    grouped: dict[str, list[JobRecord]] = {}
    for record in records:
        grouped.setdefault(record.base_id, []).append(record)
    return grouped
