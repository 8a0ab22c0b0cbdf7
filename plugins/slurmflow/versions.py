"""Which Slurm release has what: the one table of version-gated features, and version parsing.

Pure module (no Airflow, no I/O). Everything that differs between the Slurm releases we support
(:data:`MINIMUM` to 25.x) is one row of :data:`FEATURES`; code asks a :class:`SlurmFeatures`
(``features.has("squeue_exit_code_pair")``), never compares version numbers itself.

The version that matters is the *client tools'* on the login node: squeue, sacct and scontrol
format their output, and parse our flags and state names, in the client (slurmctld sends numbers;
``job_state_string`` runs in the client's libslurm). ``scontrol --version`` prints it without
an RPC to the controller. The controller may be newer (Slurm talks to clients up to two releases
older), which changes nothing we print or parse.

Sources are SchedMD's own: ``NEWS`` / ``RELEASE_NOTES`` / ``CHANGELOG/slurm-X.md`` of the release,
or the source file at the release tag (``slurm-20-11-9-1:src/squeue/print.c``) where the notes
are silent. "<= 14.03" means: present in the oldest tag checked (slurm-14-03-11-1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurmflow.errors import SlurmError


@dataclass(frozen=True, order=True)
class SlurmVersion:
    """A Slurm release, ordered by ``(major, minor, micro)``; ``extra`` is kept for display only
    (``0rc1``, Debian's ``-1``): features are gated by major.minor release, never by a build."""

    major: int
    minor: int
    micro: int = 0
    extra: str = ""

    @property
    def release(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor:02d}.{self.micro}" + (f"-{self.extra}" if self.extra else "")


#: The oldest release we support: the oldest with recorded fixtures (tests/unit/fixtures/slurm/).
#: Everything marked ``required`` below is older than this.
MINIMUM = SlurmVersion(20, 11)


class UnsupportedSlurmVersion(SlurmError):
    """The login node's Slurm is older than :data:`MINIMUM`; no retry can help."""


@dataclass(frozen=True)
class Feature:
    """One fact of the table.

    :param since: first release (major, minor) that has it.
    :param until: first release that no longer has it (``None``: still there).
    :param source: where the fact comes from (release notes, or the source at a release tag).
    :param what: what it is and who in slurmflow depends on it.
    :param required: slurmflow relies on it unconditionally: it must predate :data:`MINIMUM`.
    """

    since: tuple[int, int]
    until: tuple[int, int] | None
    source: str
    what: str
    required: bool = False

    def in_release(self, release: tuple[int, int]) -> bool:
        return self.since <= release and (self.until is None or release < self.until)


#: THE table. Rows that switch behaviour are read by commands.py / parsing.py; ``required`` rows
#: are what we use everywhere (they set the floor); the rest are facts checked once so that no
#: one has to again (we parse text, not ``--json``).
FEATURES: dict[str, Feature] = {
    # --- switches: code reads these -------------------------------------------------------------
    "squeue_exit_code_pair": Feature(
        (23, 2), None, "RELEASE_NOTES 23.02: 'squeue - align print format for exit and derived codes "
        "... (<exit_status>:<signal_number>)' (commit 93928b0743)",
        "squeue --Format=exit_code prints EXIT:SIGNAL; before it printed the raw wait status "
        "(768 = exit 3, 15 = SIGTERM). parsing.parse_squeue"),
    "state_requeued_cron": Feature(
        (20, 11), (21, 8), "slurm-20-11-9-1:src/common/slurm_protocol_defs.c job_state_string(); "
        "gone from slurm-21-08", "job state REQUEUED_CRON (a requeued scrontab job); squeue --states "
        "accepts the name only where it exists. commands.live_states"),
    "state_expediting": Feature(
        (25, 11), None, "RELEASE_NOTES.md 25.11: 'Expedited Requeue' mode (--requeue=expedite); "
        "slurm-25-11-7-1:src/common/slurm_protocol_defs.c job_state_string()",
        "job state EXPEDITING (checked for an expedited requeue: the job comes back); squeue "
        "--states rejects the name before 25.11. commands.live_states"),
    "sacct_exit_code_over_128": Feature(
        (25, 11), None, "CHANGELOG/slurm-25.11.md 25.11.0rc1: 'Don't subtract 128 from sacct returned "
        "exit codes for the codes above 128' (commit 831571cb84)",
        "sacct ExitCode keeps exit statuses >= 128 (137:0); before, sacct printed them minus 128 "
        "(9:0) while scontrol and squeue did not. JobState.exit_code from sacct is that number"),
    # --- required: slurmflow uses these on every supported release ------------------------------
    "squeue_me": Feature(
        (20, 2), None, "RELEASE_NOTES 20.02: 'squeue - added \"--me\" option, equivalent to --user=$USER'",
        "squeue --me: commands.squeue_by_name, commands.submit_once", required=True),
    "squeue_format_fields": Feature(
        (14, 11), None, "slurm-14-11-11-1:src/squeue/opts.c (exit_code, restartcnt; the other "
        "--Format fields and the width:suffix syntax <= 14.03)",
        "squeue --Format=JobID,ArrayJobID,ArrayTaskID,Name,State,Reason,exit_code,RestartCnt,"
        "NodeList,TimeUsed with width and '|' suffix: parsing.SQUEUE_FIELDS", required=True),
    "sacct_reason": Feature(
        (19, 5), None, "slurm-19-05-8-1:src/sacct/sacct.c (field table)",
        "sacct --format=Reason: parsing.SACCT_FIELDS", required=True),
    "sacct_alloc_tres": Feature(
        (15, 8), None, "slurm-15-08-13-1:src/sacct/sacct.c (field table; TRES came in 15.08)",
        "sacct AllocTRES (GPUs): usage.USAGE_FIELDS", required=True),
    "sacct_consumed_energy_raw": Feature(
        (14, 3), None, "slurm-14-03-11-1:src/sacct/sacct.c", "sacct ConsumedEnergyRaw: usage.USAGE_FIELDS",
        required=True),
    "sacct_duplicates": Feature(
        (14, 3), None, "slurm-14-03-11-1:src/sacct/options.c",
        "sacct --duplicates --allocations --parsable2: commands.sacct_*", required=True),
    "sbatch_parsable_test_only": Feature(
        (14, 3), None, "slurm-14-03-11-1:src/sbatch/opt.c",
        "sbatch --parsable (submit_once) and --test-only (preflight)", required=True),
    "scontrol_oneliner": Feature(
        (14, 3), None, "slurm-14-03-11-1:src/scontrol/scontrol.c",
        "scontrol --oneliner show job: parsing.parse_scontrol_jobs", required=True),
    "gpu_options": Feature(
        (19, 5), None, "RELEASE_NOTES 19.05: 'Add GPU scheduling options for salloc, sbatch and srun: "
        "--cpus-per-gpu, -G/--gpus, --gpu-bind, ...'",
        "sbatch --gpus, --gpus-per-node, --gpus-per-task, --gpu-bind, --cpus-per-gpu, --mem-per-gpu: "
        "sbatch.OPTIONS", required=True),
    "job_states": Feature(
        (18, 8), None, "slurm-18-08-9-1:src/common/slurm_protocol_defs.c (SIGNALING is the newest "
        "of them; RESV_DEL_HOLD 17.11, REQUEUE_FED and OUT_OF_MEMORY 17.02)",
        "every state name in states.SlurmState but the two gated ones above", required=True),
    # --- checked, not used: we parse text --------------------------------------------------------
    "sacct_tres_usage": Feature(
        (18, 8), None, "slurm-18-08-9-1:src/sacct/sacct.c (TRESUsageInTot and the other TRESUsage*)",
        "per-TRES usage fields (usage.py reads MaxRSS/TotalCPU instead)"),
    "json_output": Feature(
        (21, 8), None, "NEWS 21.08.0rc2: 'squeue - Add --json and --yaml arguments', same for sacct",
        "squeue/sacct --json"),
    "json_data_parser": Feature(
        (23, 2), None, "RELEASE_NOTES 23.02: 'New data_parser interface with v0.0.39 plugin'; "
        "scontrol show job --json from 23.02 too",
        "--json=<data_parser version>: the JSON schema is versioned (v0.0.39, 40, 41...) and "
        "old ones are removed; one more reason we parse text"),
    "sacct_planned": Feature(
        (23, 2), None, "NEWS 23.02.0rc1: 'sacct - Rename 'Reserved' field to 'Planned''",
        "sacct Planned (wait time; 'Reserved' before 23.02). The PLANNED *node* state is older: "
        "NEWS 21.08.0rc1"),
    "sacct_array": Feature(
        (23, 2), None, "RELEASE_NOTES 23.02: 'sacct - Add --array option to expand job arrays'",
        "sacct --array (parsing expands 123_[2-5] itself on every release)"),
}


#: Job state names that exist in some supported releases only (the rest are ``job_states``).
GATED_STATES: dict[str, str] = {"REQUEUED_CRON": "state_requeued_cron", "EXPEDITING": "state_expediting"}


def _feature(name: str) -> Feature:
    try:
        return FEATURES[name]
    except KeyError:
        raise KeyError(f"no Slurm feature {name!r}; known: {', '.join(sorted(FEATURES))}") from None


@dataclass(frozen=True)
class SlurmFeatures:
    """What one Slurm release has, from :data:`FEATURES`.

    :param version: the login node's Slurm client version.
    """

    version: SlurmVersion

    def has(self, name: str) -> bool:
        """Whether this release has feature ``name`` (a key of :data:`FEATURES`).

        :raises KeyError: ``name`` is not in the table (a typo must not read as "absent").
        """
        return _feature(name).in_release(self.version.release)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for n, f in FEATURES.items() if f.in_release(self.version.release))


def features_for(version: SlurmVersion | str) -> SlurmFeatures:
    """The feature set of a release (a :class:`SlurmVersion` or any text :func:`parse_version` reads).

    :raises UnsupportedSlurmVersion: older than :data:`MINIMUM`.
    """
    parsed = parse_version(version) if isinstance(version, str) else version
    if parsed.release < MINIMUM.release:
        raise UnsupportedSlurmVersion(
            f"Slurm {parsed} is not supported: slurmflow needs Slurm {MINIMUM.major}.{MINIMUM.minor:02d} "
            f"or newer on the login node (what 'scontrol --version' prints there)")
    return SlurmFeatures(parsed)


# "slurm 22.05.8", "slurm-wlm 20.11.9" (Debian's package name), "slurm 25.05.0-0rc1",
# "SLURM_VERSION            = 23.11.4" (scontrol show config), "slurm 24.05.4-1" (a build suffix).
_VERSION_RE = re.compile(
    r"(?:^|\n)\s*(?:slurm(?:-wlm)?\s+|SLURM_VERSION\s*=\s*)(\d+)\.(\d+)(?:\.(\d+))?(?:-(\S+))?",
    re.IGNORECASE,
)


def parse_version(text: str) -> SlurmVersion:
    """The version in ``sinfo --version`` / ``scontrol --version`` output or in
    ``scontrol show config`` (its ``SLURM_VERSION`` line).

    :raises ValueError: no Slurm version in the text.
    """
    match = _VERSION_RE.search(text or "")
    if not match:
        raise ValueError(f"no Slurm version in {text.strip()[:200]!r}")
    major, minor, micro, extra = match.groups()
    return SlurmVersion(int(major), int(minor), int(micro or 0), extra or "")


def read_probe(exit_code: int, stdout: str) -> SlurmFeatures | None:
    """The features from the run of :func:`slurmflow.commands.slurm_version`; ``None`` when it
    failed or printed no version (the callers then use what every supported release accepts).

    :raises UnsupportedSlurmVersion: the release is older than :data:`MINIMUM`.
    """
    if exit_code != 0:
        return None
    try:
        version = parse_version(stdout)
    except ValueError:
        return None
    return features_for(version)
