"""Staged pipelines (``experiment_pipeline``): stage keys, the stage cache and its job-side lock.

Pure helpers, no I/O (DVC's ``dvc.yaml`` stages, made Slurm jobs; README "Staged pipelines"):

* a stage's **key** is the hash of (code version, its params, its inputs' content hashes), see
  :func:`stage_key`; change one param and only that stage's key and its downstream keys change;
* its outputs live in a **content-addressed cache** on the cluster filesystem,
  ``<root>/<stage>/<key>/`` with ``stage.json`` (:class:`StageCache`, docs/CONTRACTS.md);
* the job publishes an entry under ``flock <root>/<stage>/<key>.lock`` around "check, compute,
  publish" (:func:`stage_job_lines`): two concurrent jobs of one key compute it once, the second
  waits on the lock and finds the entry; an entry is written to a temporary directory inside the
  stage directory and renamed into place, so a half-written entry is never seen.

The Airflow side checks ``<entry>/stage.json`` before submitting (:func:`cache_check_command`): a
cached stage submits no Slurm job at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the stages of ``experiment_pipeline``, in order (also their task ids)
STAGES = ("prepare", "train", "evaluate")
#: each stage's upstream stages: their outputs are its inputs (DVC's ``deps`` on ``outs``)
INPUTS: dict[str, tuple[str, ...]] = {"prepare": (), "train": ("prepare",), "evaluate": ("prepare", "train")}
#: the file describing a cache entry (key, inputs, params, code version, files, created_by)
STAGE_FILE = "stage.json"
#: in the job directory: ``computed`` or ``cached`` (another job published the key meanwhile)
OUTCOME_FILE = "stage-outcome"
#: the job's outputs before publication, relative to its job directory
OUT_DIR = "out"
#: where a job finds its inputs (copies of the upstream entries), relative to its job directory
IN_DIR = "in"
KEY = re.compile(r"^[0-9a-f]{64}$")
MODE = re.compile(r"^[0-7]?[0-7]{3}$")
GROUP = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
#: the default cache, under the cluster user's home (Variable ``slurmflow_stage_cache`` overrides)
DEFAULT_CACHE_DIR = "slurmflow-stage-cache"


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, so equal params hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, code_version: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The stage's cache key: sha256 of (stage, code version, params, inputs' content hashes).

    :param stage: one of :data:`STAGES`.
    :param code_version: the training image's content tag (hash of Dockerfile, code, locked deps).
    :param params: the stage's own params (only those: a train param does not change prepare's key).
    :param inputs: upstream stage -> that entry's ``outputs_hash`` (content, not key: an upstream
        recomputed to the same bytes keeps its downstream cached).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    missing = sorted(set(INPUTS[stage]) - set(inputs))
    if missing:
        raise ValueError(f"stage {stage} needs the content hashes of {', '.join(missing)}")
    text = canonical_json({"stage": stage, "code": code_version, "params": dict(params), "inputs": dict(inputs)})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StageCache:
    """The content-addressed stage cache on the cluster filesystem.

    :param root: absolute directory shared by the group (every user's runs find each other's entries).
    :param group: Unix group given to everything in the cache (``chgrp``); None keeps the user's.
    :param mode: octal mode of the cache's directories (setgid ``2770`` by default: new files
        inherit the group); files get the same bits without execute/setgid (``0660``).
    """

    root: str
    group: str | None = None
    mode: str = "2770"

    def __post_init__(self) -> None:
        if not self.root.startswith("/") or "\n" in self.root:
            raise ValueError(f"stage cache path must be absolute, got {self.root!r}")
        if self.group is not None and not GROUP.match(self.group):
            raise ValueError(f"stage cache group {self.group!r} is not a group name")
        if not MODE.match(self.mode):
            raise ValueError(f"stage cache mode {self.mode!r} is not an octal mode such as 2770")

    @classmethod
    def from_setting(cls, value: str | Mapping[str, Any] | None, home: str) -> StageCache:
        """From Variable ``slurmflow_stage_cache``: a path, or ``{"path", "group", "mode"}`` (JSON).

        :param home: the cluster user's home (the default root is ``<home>/slurmflow-stage-cache``).
        """
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("{") else ({"path": text} if text else {})
        value = dict(value or {})
        unknown = sorted(set(value) - {"path", "group", "mode"})
        if unknown:
            raise ValueError(f"slurmflow_stage_cache: unknown keys {unknown}; valid: group, mode, path")
        return cls(root=str(value.get("path") or f"{home.rstrip('/')}/{DEFAULT_CACHE_DIR}"),
                   group=value.get("group") or None, mode=str(value.get("mode") or "2770"))

    @property
    def file_mode(self) -> str:
        """The mode of published files: the directory mode's read/write bits (``2770`` -> ``660``)."""
        return format(int(self.mode, 8) & 0o666, "03o")

    def stage_dir(self, stage: str) -> str:
        return f"{self.root.rstrip('/')}/{_stage(stage)}"

    def entry(self, stage: str, key: str) -> str:
        """``<root>/<stage>/<key>``: the published outputs and ``stage.json``."""
        return f"{self.stage_dir(stage)}/{_key(key)}"

    def stage_file(self, stage: str, key: str) -> str:
        return f"{self.entry(stage, key)}/{STAGE_FILE}"

    def lock(self, stage: str, key: str) -> str:
        """``<root>/<stage>/<key>.lock``: held by the job computing the key."""
        return f"{self.entry(stage, key)}.lock"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.root, "group": self.group, "mode": self.mode}


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return stage


def _key(key: str) -> str:
    if not KEY.match(key):
        raise ValueError(f"a stage key is 64 hex digits, got {key!r}")
    return key


def cache_check_command(cache: StageCache, stage: str, key: str) -> str:
    """Shell command printing the entry's ``stage.json`` (exit 0) or nothing (exit 1): the
    Airflow-side "cached -> no job" check, run on the login node. Every path is quoted."""
    path = shlex.quote(cache.stage_file(stage, key))
    return f"test -f {path} && cat -- {path}"


def stage_record(stage: str, key: str, code_version: str, params: Mapping[str, Any],
                 inputs: Mapping[str, Mapping[str, str]], created_by: Mapping[str, Any]) -> dict[str, Any]:
    """What ``stage.json`` holds besides the output hashes the job adds.

    :param inputs: upstream stage -> ``{"key", "outputs_hash", "entry"}``.
    :param created_by: the run that computed it (dag, run id, task).
    """
    return {"stage": stage, "key": key, "code_version": code_version, "params": dict(params),
            "inputs": {k: dict(v) for k, v in inputs.items()}, "created_by": dict(created_by)}


def stage_job_lines(cache: StageCache, stage: str, key: str, compute: str, record: Mapping[str, Any],
                    inputs: Mapping[str, str], publish: str = OUT_DIR) -> str:
    """The job's command: under the key's lock, reuse a published entry or compute and publish it.

    Runs in the batch shell (``$SLURMFLOW_JOB_DIR`` is the job directory). Steps, all under
    ``flock <key>.lock`` (a second job of the same key waits here, then finds the entry):

    1. ``<entry>/stage.json`` exists: write ``cached`` to :data:`OUTCOME_FILE`, exit 0;
    2. copy the inputs (upstream entries) to ``$SLURMFLOW_JOB_DIR/in/<stage>/``, run ``compute``;
    3. copy ``publish`` (relative to the job dir) into a temporary directory inside the stage
       directory, hash every file (sha256; ``outputs_hash`` is the hash of the sorted listing),
       write ``stage.json``, apply the group and mode, ``mv -T`` it to the entry (one rename on
       one filesystem: atomic), write ``computed``.

    :param compute: shell fragment computing the outputs (e.g. a ``container_command``); its exit
        status is the job's when it fails.
    :param record: :func:`stage_record` (rendered into ``stage.json``; the job adds the hashes).
    :param inputs: upstream stage -> its cache entry (absolute path).
    """
    stage_dir, entry, lock = cache.stage_dir(stage), cache.entry(stage, key), cache.lock(stage, key)
    q = shlex.quote
    head = canonical_json(dict(record))[:-1]  # the JSON object, open: the job appends the hashes
    group = (f"chgrp -R -- {q(cache.group)} \"$sf_tmp\" || exit 1" if cache.group else ":")
    chgrp_dir = (f"chgrp -- {q(cache.group)} {q(cache.root)} {q(stage_dir)} {q(lock)} 2>/dev/null"
                 if cache.group else ":")
    lines = [
        f"# slurmflow: stage {stage}, key {key}: compute once under the key's lock, publish atomically",
        "umask 007",
        f"mkdir -p -- {q(stage_dir)} || exit 1",
        f"chmod {cache.mode} {q(cache.root)} {q(stage_dir)} 2>/dev/null",
        f"exec 9>>{q(lock)} || exit 1",
        chgrp_dir,
        f"echo {q(f'[slurmflow] stage {stage}: waiting for the lock of key {key}')}",
        "flock 9 || exit 1",
        f"if [ -f {q(entry + '/' + STAGE_FILE)} ]; then",
        f"  echo {q(f'[slurmflow] stage {stage}: key {key} is in the cache (published meanwhile): nothing to do')}",
        f"  echo cached > \"$SLURMFLOW_JOB_DIR/{OUTCOME_FILE}\"",
        "  exit 0",
        "fi",
        f"rm -rf -- \"$SLURMFLOW_JOB_DIR/{OUT_DIR}\" \"$SLURMFLOW_JOB_DIR/{IN_DIR}\"",
        f"mkdir -p -- \"$SLURMFLOW_JOB_DIR/{OUT_DIR}\" || exit 1",
    ]
    for upstream, path in sorted(inputs.items()):
        dest = f"\"$SLURMFLOW_JOB_DIR/{IN_DIR}/{_stage(upstream)}\""
        lines += [f"mkdir -p -- {dest} || exit 1",
                  f"cp -R -- {q(path.rstrip('/') + '/.')} {dest}/ || exit 1"]
    lines += [
        "{",
        compute.rstrip("\n"),
        "}",
        "sf_rc=$?",
        "if [ \"$sf_rc\" -ne 0 ]; then",
        f"  echo {q(f'[slurmflow] stage {stage}: the computation failed')} \"(exit $sf_rc); nothing published\" >&2",
        "  exit \"$sf_rc\"",
        "fi",
        f"sf_tmp=$(mktemp -d {q(f'{stage_dir}/.tmp-{key}.')}XXXXXX) || exit 1",
        f"cp -R -- \"$SLURMFLOW_JOB_DIR/\"{q(publish.strip('/') + '/.')} \"$sf_tmp/\" || exit 1",
        # hashes of every file, by sorted relative path (LC_ALL=C: one order everywhere)
        "(cd \"$sf_tmp\" && find . -type f -print | LC_ALL=C sort | sed 's|^\\./||' | "
        "while IFS= read -r f; do printf '%s  %s\\n' \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" \"$f\"; done) "
        "> \"$SLURMFLOW_JOB_DIR/stage-files.sha256\" || exit 1",
        "sf_hash=$(sha256sum < \"$SLURMFLOW_JOB_DIR/stage-files.sha256\" | cut -d' ' -f1)",
        "{",
        f"  printf '%s' {q(head)}",
        "  printf ',\"outputs_hash\":\"%s\",\"files\":{' \"$sf_hash\"",
        "  awk '{h=$1; f=substr($0, 67); gsub(/\\\\/, \"\\\\\\\\\", f); gsub(/\"/, \"\\\\\\\"\", f); "
        "printf \"%s\\\"%s\\\":\\\"%s\\\"\", (NR>1 ? \",\" : \"\"), f, h}' \"$SLURMFLOW_JOB_DIR/stage-files.sha256\"",
        "  printf '}}\\n'",
        f"}} > \"$sf_tmp/{STAGE_FILE}\" || exit 1",
        group,
        f"find \"$sf_tmp\" -type d -exec chmod {cache.mode} {{}} + && "
        f"find \"$sf_tmp\" -type f -exec chmod {cache.file_mode} {{}} + || exit 1",
        f"mv -T -- \"$sf_tmp\" {q(entry)} || exit 1",
        f"echo computed > \"$SLURMFLOW_JOB_DIR/{OUTCOME_FILE}\"",
        f"echo {q(f'[slurmflow] stage {stage}: published key {key}')} \"(outputs $sf_hash)\"",
        "exec 9>&-",
    ]
    return "\n".join(lines) + "\n"


def input_paths(stage: str, upstream: Sequence[str] = ()) -> dict[str, str]:
    """Where a job finds each upstream's outputs, relative to its job dir (``in/<stage>``)."""
    return {name: f"{IN_DIR}/{name}" for name in (upstream or INPUTS[stage])}
