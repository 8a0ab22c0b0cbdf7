"""What a finished job used, from sacct's accounting: CPU efficiency, MaxRSS, GPU-hours, energy.

Pure module (no Airflow, no I/O). :func:`parse_usage` reads
``sacct --noheader --parsable2 --duplicates --format=<USAGE_FIELDS> --jobs=<ids>`` (built by
:func:`slurmflow.commands.sacct_usage`) into one :class:`JobUsage` per job or array task;
:meth:`JobUsage.as_tags` gives the MLflow tags, :meth:`JobUsage.as_dict` the catalog's record,
and :func:`summarize` folds a job array's tasks into one :class:`UsageSummary` for a sweep.

Where each figure comes from (Slurm 22.05; the job line is the allocation, step lines are
``.batch``, ``.extern``, ``.0``...):

- elapsed, allocated CPUs, nodes, GPUs (``AllocTRES``) and core-seconds (``CPUTimeRAW``):
  the job line.
- CPU time used (``TotalCPU``): the job line, which sums its steps; the steps' sum when
  that is larger (a job line that has not been folded yet).
- MaxRSS: steps only (the job line leaves it blank); the largest step. It is the largest
  single *task*'s peak, not a sum over tasks or nodes, and it is sampled every
  ``JobAcctGatherFrequency`` seconds: a step shorter than one interval may have none.
- energy (``ConsumedEnergyRaw``, joules): only where the site runs an ``acct_gather_energy``
  plugin; otherwise every line says ``0`` or nothing, and the figure is ``None``.

A requeued (preempted) job prints one job line per run with ``--duplicates``; all runs count,
since the cluster spent them all: times, core-seconds, GPU-hours and energy add up, MaxRSS is
the largest, and the allocation (CPUs, GPUs, nodes) is the last run's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slurmflow.parsing import SlurmParseError, parse_duration_exact, split_job_id

#: ``sacct --format`` fields, printed with ``--parsable2`` (``|`` separated, no trailing ``|``).
USAGE_FIELDS: tuple[str, ...] = (
    "JobID",
    "State",
    "ElapsedRaw",
    "TotalCPU",
    "CPUTimeRAW",
    "AllocCPUS",
    "AllocTRES",
    "MaxRSS",
    "ConsumedEnergyRaw",
    "NNodes",
)

#: Prefix of every tag :meth:`JobUsage.as_tags` writes (shared with the other Slurm facts).
TAG_PREFIX = "slurm."

# sacct scales memory by 1024 and appends the unit; a bare number is bytes (22.05 keeps TRES
# memory in bytes).
_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)$")
_GPU_TRES_RE = re.compile(r"^gres/gpu(?::(?P<type>[^=]+))?$")
# Slurm's "no value" for a 64-bit counter, which some versions print for energy.
_NO_VAL64 = 0xFFFFFFFFFFFFFFFE


@dataclass
class _Run:
    """One run of a job (its job line, then its steps as they come); a requeued job has several."""

    state: str
    elapsed_seconds: int
    alloc_cpus: int
    nodes: int
    alloc_gpus: int
    core_seconds: int
    job_cpu_seconds: float
    job_energy: int | None
    step_cpu_seconds: list[float] = field(default_factory=list)
    step_rss: list[int] = field(default_factory=list)
    step_energy: list[int] = field(default_factory=list)

    @property
    def cpu_seconds(self) -> float:
        return max(self.job_cpu_seconds, sum(self.step_cpu_seconds))

    @property
    def energy(self) -> int | None:
        if self.job_energy:
            return self.job_energy
        # Steps overlap in time (.extern spans the allocation, .0 runs inside .batch), so their
        # energies are not additive: the largest step is the closest to the job's own figure.
        return max(self.step_energy, default=None)


@dataclass(frozen=True)
class JobUsage:
    """What one job (or one array task) used, all its runs together.

    :param job_id: the id as Slurm prints it: ``123``, or ``123_4`` for an array task.
    :param base_id: the job, or the array the task belongs to (``123``).
    :param array_task: the array task index, ``None`` for a plain job.
    :param state: the last run's state as accounting has it (``COMPLETED``, ``FAILED``...).
    :param runs: job lines seen: more than 1 when Slurm requeued the job.
    :param elapsed_seconds: wall time, summed over runs.
    :param alloc_cpus: CPUs allocated (last run).
    :param nodes: nodes allocated (last run).
    :param alloc_gpus: GPUs allocated (last run), from ``AllocTRES``; 0 when none (or when the
        site does not account ``gres/gpu`` in ``AccountingStorageTRES``).
    :param total_cpu_seconds: CPU time the job's processes used (user + system).
    :param core_seconds: CPU time allocated: allocated CPUs x elapsed, summed over runs.
    :param gpu_seconds: GPUs x elapsed, summed over runs.
    :param max_rss_bytes: the largest peak resident memory of one task of any step; ``None``
        when no step was sampled.
    :param energy_joules: energy the nodes consumed; ``None`` where the site does not record it.
    """

    job_id: str
    base_id: str
    array_task: int | None
    state: str
    runs: int
    elapsed_seconds: int
    alloc_cpus: int
    nodes: int
    alloc_gpus: int
    total_cpu_seconds: float
    core_seconds: int
    gpu_seconds: int
    max_rss_bytes: int | None = None
    energy_joules: int | None = None

    @property
    def cpu_efficiency(self) -> float | None:
        """CPU time used / CPU time allocated (1.0 = every allocated CPU busy all the time);
        ``None`` when nothing was allocated for any time (a job that never ran)."""
        return _ratio(self.total_cpu_seconds, self.core_seconds)

    @property
    def gpu_hours(self) -> float:
        """Allocated GPUs x elapsed hours (allocated, not busy: sacct has no GPU utilisation)."""
        return self.gpu_seconds / 3600

    def as_tags(self) -> dict[str, str]:
        """MLflow tags (``slurm.cpu_efficiency``...); unknown figures are left out."""
        return _tags({"alloc_cpus": self.alloc_cpus, "alloc_gpus": self.alloc_gpus, "nodes": self.nodes,
                      **_figures(self)})

    def as_dict(self) -> dict[str, Any]:
        """The catalog's record: plain JSON types, ``None`` for an unknown figure."""
        return {"job_id": self.job_id, "array_task": self.array_task, "state": self.state, "runs": self.runs,
                "elapsed_seconds": self.elapsed_seconds, "alloc_cpus": self.alloc_cpus, "nodes": self.nodes,
                "alloc_gpus": self.alloc_gpus, "core_seconds": self.core_seconds, **_figures(self)}


@dataclass(frozen=True)
class UsageSummary:
    """A job array's tasks together (a sweep's summary).

    :param job_id: the array's id (or the ids joined, when the usages came from several jobs).
    :param tasks: how many tasks (jobs) have accounting records.
    :param total_cpu_seconds: CPU time used, summed.
    :param core_seconds: CPU time allocated, summed.
    :param gpu_seconds: GPUs x elapsed, summed.
    :param max_rss_bytes: the largest of the tasks' MaxRSS; ``None`` when no task has one.
    :param energy_joules: summed over the tasks that have it; ``None`` when none has.
    """

    job_id: str
    tasks: int
    total_cpu_seconds: float
    core_seconds: int
    gpu_seconds: int
    max_rss_bytes: int | None = None
    energy_joules: int | None = None

    @property
    def cpu_efficiency(self) -> float | None:
        """Overall: all CPU time used / all CPU time allocated (long tasks weigh more)."""
        return _ratio(self.total_cpu_seconds, self.core_seconds)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    def as_tags(self) -> dict[str, str]:
        """Tags with the same names as :meth:`JobUsage.as_tags`, plus ``slurm.tasks``."""
        return _tags({"tasks": self.tasks, **_figures(self)})

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "tasks": self.tasks, "core_seconds": self.core_seconds, **_figures(self)}


def _figures(usage: JobUsage | UsageSummary) -> dict[str, Any]:
    """The figures a job and a summary share, rounded as tags and catalog show them."""
    return {
        "total_cpu_seconds": round(usage.total_cpu_seconds, 3),
        "cpu_efficiency": _round(usage.cpu_efficiency),
        "max_rss_bytes": usage.max_rss_bytes,
        "gpu_hours": round(usage.gpu_hours, 4),
        "energy_joules": usage.energy_joules,
    }


def summarize(usages: Iterable[JobUsage], job_id: str | None = None) -> UsageSummary:
    """Fold tasks (or jobs) into one :class:`UsageSummary`.

    :param usages: e.g. the values of :meth:`SlurmHook.usage` for a sweep's array.
    :param job_id: the summary's id; by default the tasks' common ``base_id`` (their ids
        joined with ``,`` when they belong to different jobs).
    """
    items = list(usages)
    if job_id is None:
        job_id = ",".join(sorted({u.base_id for u in items}, key=_numeric_first))
    rss = [u.max_rss_bytes for u in items if u.max_rss_bytes is not None]
    energy = [u.energy_joules for u in items if u.energy_joules is not None]
    return UsageSummary(
        job_id=job_id,
        tasks=len(items),
        total_cpu_seconds=sum(u.total_cpu_seconds for u in items),
        core_seconds=sum(u.core_seconds for u in items),
        gpu_seconds=sum(u.gpu_seconds for u in items),
        max_rss_bytes=max(rss, default=None),
        energy_joules=sum(energy) if energy else None,
    )


def parse_usage(text: str) -> dict[str, JobUsage]:
    """Parse ``sacct --noheader --parsable2 --duplicates --format=<USAGE_FIELDS>`` output.

    Steps follow their job line (sacct prints them so), and belong to the run whose line came
    last. Tasks of an array that never started (``123_[5-9]``) are left out: they used nothing.

    :return: per job id as Slurm prints it (``123``, ``123_4``), in the order sacct printed them.
    :raises SlurmParseError: a line without the expected columns, a value that is not a
        number, or a step without its job line.
    """
    runs: dict[str, list[_Run]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) != len(USAGE_FIELDS):
            raise SlurmParseError(f"unexpected sacct line (wanted {len(USAGE_FIELDS)} fields): {line!r}")
        row = {name: value.strip() for name, value in zip(USAGE_FIELDS, cols, strict=True)}
        job_part, dot, _step = row["JobID"].partition(".")
        if "_[" in job_part:
            continue
        split_job_id(job_part)  # a job id, or SlurmParseError
        if dot and job_part not in runs:
            raise SlurmParseError(f"sacct step before its job line: {line!r}")
        try:
            if not dot:
                runs.setdefault(job_part, []).append(_job_run(row))
                continue
            run = runs[job_part][-1]
            run.step_cpu_seconds.append(parse_duration_exact(row["TotalCPU"]) or 0.0)
            rss = parse_memory(row["MaxRSS"])
            if rss:
                run.step_rss.append(rss)
            energy = _energy(row["ConsumedEnergyRaw"])
            if energy:
                run.step_energy.append(energy)
        except ValueError as exc:  # int() and the duration/memory parsers (SlurmParseError is one)
            raise SlurmParseError(f"unreadable sacct line {line!r}: {exc}") from None
    return {job_id: _usage(job_id, job_runs) for job_id, job_runs in runs.items()}


def parse_memory(text: str) -> int | None:
    """sacct memory (``90432K``, ``1.50G``, ``0``; a bare number is bytes) in bytes; ``None`` for blank.

    :raises SlurmParseError: for anything else.
    """
    text = text.strip()
    if not text:
        return None
    match = _MEMORY_RE.match(text.upper())
    if not match:
        raise SlurmParseError(f"malformed memory size: {text!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_gpus(tres: str) -> int:
    """GPUs in a TRES string (``billing=8,cpu=8,gres/gpu:a100=4,gres/gpu=4,mem=64G,node=1``).

    Slurm lists the untyped ``gres/gpu`` total next to each typed count when the site
    accounts both, so the total wins; the typed counts are added only when it is missing.
    """
    total: int | None = None
    typed = 0
    for item in tres.split(","):
        name, _, value = item.strip().partition("=")
        match = _GPU_TRES_RE.match(name)
        if not match or not value.isdigit():
            continue
        if match.group("type") is None:
            total = int(value)
        else:
            typed += int(value)
    return typed if total is None else total


def _job_run(row: Mapping[str, str]) -> _Run:
    elapsed = _int(row["ElapsedRaw"])
    cpus = _int(row["AllocCPUS"])
    gpus = parse_gpus(row["AllocTRES"])
    return _Run(
        state=row["State"].split(" ", 1)[0],  # "CANCELLED by 1001" -> "CANCELLED"
        elapsed_seconds=elapsed,
        alloc_cpus=cpus,
        nodes=_int(row["NNodes"]),
        alloc_gpus=gpus,
        # CPUTimeRAW is Slurm's own allocated CPUs x elapsed; the product stands in if it is blank.
        core_seconds=_int(row["CPUTimeRAW"]) if row["CPUTimeRAW"] else cpus * elapsed,
        job_cpu_seconds=parse_duration_exact(row["TotalCPU"]) or 0.0,
        job_energy=_energy(row["ConsumedEnergyRaw"]),
    )


def _usage(job_id: str, runs: list[_Run]) -> JobUsage:
    base, task = split_job_id(job_id)
    last = runs[-1]
    rss = [value for run in runs for value in run.step_rss]
    energy = [run.energy for run in runs if run.energy is not None]
    return JobUsage(
        job_id=job_id,
        base_id=base,
        array_task=task,
        state=last.state,
        runs=len(runs),
        elapsed_seconds=sum(run.elapsed_seconds for run in runs),
        alloc_cpus=last.alloc_cpus,
        nodes=last.nodes,
        alloc_gpus=last.alloc_gpus,
        total_cpu_seconds=sum(run.cpu_seconds for run in runs),
        core_seconds=sum(run.core_seconds for run in runs),
        gpu_seconds=sum(run.alloc_gpus * run.elapsed_seconds for run in runs),
        max_rss_bytes=max(rss, default=None),
        energy_joules=sum(energy) if energy else None,
    )


def _energy(text: str) -> int | None:
    # Without an acct_gather_energy plugin sacct prints 0 (or nothing): "not measured", not
    # "no energy used". Slurm's NO_VAL sentinel is as meaningless.
    value = _int(text)
    return value if 0 < value < _NO_VAL64 else None


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text else 0


def _ratio(used: float, allocated: int) -> float | None:
    return used / allocated if allocated > 0 else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _tags(values: Mapping[str, Any]) -> dict[str, str]:
    return {f"{TAG_PREFIX}{name}": str(value) for name, value in values.items() if value is not None}


def _numeric_first(job_id: str) -> tuple[int, str]:
    return (int(job_id), "") if job_id.isdigit() else (0, job_id)
