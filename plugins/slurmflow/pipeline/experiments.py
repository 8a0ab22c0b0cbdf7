"""Experiment configs: the LightningCLI configs in ``training/configs/`` and how they reach a job.

The configs live in the repository beside the DAGs (Astro layout: ``training/`` next to
``plugins/``), so the Airflow side knows them without asking anything: the ``config`` Param's
choices are the ``*.yaml`` files listed there when the DAG is parsed (a local directory listing,
no import, no network). A new config is a new file; nothing in ``plugins/`` or ``dags/`` names it.

A config travels *with the job*, not in the image: the job's command writes its text into the job
directory (:data:`STAGED_CONFIG`, a quoted here-document: copied, never evaluated) and passes it by
path. The image's content hash leaves ``training/configs/`` out (``constants.DEFAULT_EXCLUDES``),
so a config-only change reuses the image.

Light on purpose: :mod:`slurmflow.pipeline.params` imports :func:`experiment_configs` at parse time.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the project folder (plugins/slurmflow/pipeline/ -> three levels up)
PROJECT_ROOT = Path(__file__).resolve().parents[3]
#: where the experiment configs live, relative to the project folder
CONFIG_DIR = "training/configs"
#: the config's name inside each job directory (``config.yaml`` is hpctrain's resolved copy)
STAGED_CONFIG = "experiment.yaml"
#: the here-document's end marker; a config holding this line is refused
_HEREDOC_END = "SLURMFLOW_CONFIG_END"
#: overrides a Param owns: the job directory, the parent checkpoint
RESERVED_OVERRIDES = ("--config", "--run.job_dir", "--run.init_from", "--run.init_mode", "--args-file")


def config_dir(root: Path | str | None = None) -> Path:
    """``training/configs`` of the project (``$SLURMFLOW_PROJECT_DIR`` overrides the project folder)."""
    base = Path(root or os.environ.get("SLURMFLOW_PROJECT_DIR") or PROJECT_ROOT)
    return base / CONFIG_DIR


def experiment_configs(root: Path | str | None = None) -> list[str]:
    """The names (file stems) of the experiment configs, sorted; empty when the folder is absent."""
    folder = config_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file() and not p.name.startswith("."))


def config_path(name: str, root: Path | str | None = None) -> Path:
    """The file of config ``name``: a top-level one (the ``config`` Param's choices), or one a DAG
    owns in a subfolder (``online/online``: it needs the staging store its DAG's job provides).

    :raises ValueError: no such config (the message lists the ones there are).
    """
    if "/" in name:
        base = config_dir(root).resolve()
        path = (base / f"{name}.yaml").resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise ValueError(f"unknown config {name!r}: no {CONFIG_DIR}/{name}.yaml")
        return path
    known = experiment_configs(root)
    if name not in known:
        raise ValueError(f"unknown config {name!r}: {CONFIG_DIR}/ has {', '.join(known) or 'none'}")
    return config_dir(root) / f"{name}.yaml"


def read_config(name: str, root: Path | str | None = None) -> str:
    """The text of config ``name``, checked to travel in a here-document."""
    text = config_path(name, root).read_text(encoding="utf-8")
    if any(line.strip() == _HEREDOC_END for line in text.splitlines()):
        raise ValueError(f"config {name!r} contains the line {_HEREDOC_END}, which ends the staged copy")
    return text if text.endswith("\n") else text + "\n"


def stage_config_lines(text: str, directory: str = "$SLURMFLOW_JOB_DIR") -> list[str]:
    """Shell lines writing ``text`` to ``<directory>/experiment.yaml``.

    A quoted here-document: the shell expands nothing in it. ``directory`` is a job variable
    (``$SLURMFLOW_JOB_DIR``, a sweep trial's ``$HPCTRAIN_JOB_DIR``), written double-quoted.
    """
    return [
        "# slurmflow: the experiment config travels with the job (copied, never evaluated)",
        f"cat > \"{directory}/{STAGED_CONFIG}\" <<'{_HEREDOC_END}' || exit 1",
        *text.rstrip("\n").split("\n"),
        _HEREDOC_END,
    ]


def check_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """Refuse overrides of what a Param owns (the schema's pattern checked their form already).

    :raises ValueError: naming the override and the Param to use instead.
    """
    for item in overrides or ():
        key = item.partition("=")[0]
        if key in RESERVED_OVERRIDES:
            raise ValueError(f"override {item!r}: {key} is set by slurmflow (use the config / init_from / "
                             "init_mode Params)")


def parse_check(argv: list[str]) -> dict:
    """Parse ``hpctrain fit`` arguments with hpctrain's own LightningCLI parser, building nothing.

    The Airflow worker imports hpctrain (as the register step does), so an unknown key, a wrong
    type or a class path that does not import fails here, with the parser's message, before an
    image is built or a job queued.

    :param argv: the arguments after ``fit`` (the config as a local path).
    :return: the parsed config (``model.class_path`` etc.).
    :raises ValueError: the parser's message.
    """
    from hpctrain.errors import ConfigError
    from hpctrain.lightning_cli import check_fit_args  # torch + Lightning: only when a check runs

    try:
        return check_fit_args(argv)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
