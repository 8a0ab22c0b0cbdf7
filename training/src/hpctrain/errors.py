"""Exceptions that the command line turns into exit codes.

Each one stands for an outcome the orchestrator must tell apart from a crash: a config that can
never run (exit 2, do not retry), a job that already finished (exit 0), a preempted job that
checkpointed and must run again (exit 75, ``EX_TEMPFAIL``: the launcher requeues it).
"""

from __future__ import annotations

EXIT_CONFIG_ERROR = 2
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A configuration that cannot run: bad data source, missing file, empty collection, ..."""


class AlreadyComplete(Exception):
    """The job directory already holds a complete ``result.json``; nothing to train.

    :param result_path: path of the manifest that proves completion.
    """

    def __init__(self, result_path: str) -> None:
        super().__init__(f"job already complete: {result_path} exists; not retraining")
        self.result_path = result_path


class Preempted(Exception):
    """Training stopped on the preemption signal after writing a resumable checkpoint.

    :param checkpoint: the checkpoint the next attempt resumes from (``None`` if the signal came
        before training started, when the previous checkpoint, if any, is still the latest).
    """

    def __init__(self, checkpoint: str | None) -> None:
        super().__init__(f"preempted; checkpoint={checkpoint}")
        self.checkpoint = checkpoint
