"""Where a run is, and when it is moving again after a fault. Pure: works on samples of the
run's task instances that the observer (:mod:`scripts.chaos.observe`) took through the REST API.

A sample is what one poll saw: ``{task_id: (state, try_number)}``, the number of records in the
train task's trigger logs so far (a restarted trigger logs "starting" before any job line), and
the run's state. ``None`` fields mean the
API did not answer (the api-server was down).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scripts.chaos.table import PHASES, Phase

#: Task states in which a task is doing its work.
ACTIVE = frozenset({"running", "deferred"})
#: Run states that end a run.
RUN_DONE = frozenset({"success", "failed"})

TaskStates = Mapping[str, tuple[str | None, int]]


@dataclass(frozen=True)
class Sample:
    """One observation of a run, ``t`` seconds after the trial started."""

    t: float
    tasks: TaskStates | None
    trigger_records: int | None = None
    run_state: str | None = None


def in_phase(phase: Phase, tasks: TaskStates | None) -> bool:
    """Whether the run is in ``phase``."""
    if not tasks or phase.task_id not in tasks:
        return False
    return tasks[phase.task_id][0] in phase.states


def detect_phase(tasks: TaskStates | None, run_state: str | None = None) -> str:
    """The run's phase by name (a state-anchored key of :data:`PHASES`), or ``"done"``,
    ``"before"`` (pre-flight, job spec, or the gaps between tasks) and ``"unknown"`` (no answer)."""
    if run_state in RUN_DONE:
        return "done"
    if tasks is None:
        return "unknown"
    # later phases win: catalog is "scheduled" while register still finishes. Phases anchored on
    # the job (job-start, running, job-end) are moments inside these, not told apart by states.
    for phase in reversed([p for p in PHASES.values() if p.anchor == "state"]):
        if in_phase(phase, tasks):
            return phase.name
    return "before"


def progressed(before: Sample, after: Sample, task: str | None = None) -> bool:
    """Whether the run moved forward between two samples: a task started (or retried and runs
    again), a task succeeded, the trigger logged (it started again, or streamed job lines), or
    the run ended. With ``task``, only that task's progress counts (or the run's end): a task
    that runs beside it (reap beside register) says nothing of the victim's recovery."""
    if after.run_state in RUN_DONE:
        return True
    if before.tasks is None or after.tasks is None:
        return False
    for task_id, (state, tries) in after.tasks.items():
        if task is not None and task_id != task:
            continue
        old_state, old_tries = before.tasks.get(task_id, (None, 0))
        if state in ACTIVE and (tries > old_tries or old_state not in ACTIVE):
            return True
        if state == "success" and old_state != "success":
            return True
    if task not in (None, "train"):  # the trigger's records are the train task's
        return False
    new, old = after.trigger_records, before.trigger_records
    return new is not None and old is not None and new > old


def recovery_s(samples: Sequence[Sample], injected_at: float, fault_over_at: float,
               task: str | None = None) -> float | None:
    """Seconds from the injection to the first progress seen once the fault is over (the killed
    program restarted, the stopped one started again); ``None`` if the run never moved again.
    ``task``: only its progress counts (:func:`progressed`), for a fault aimed at one task.

    Progress compares each sample with the previous *answered* one, so a gap while the API was
    down counts as one step.
    """
    answered = [s for s in samples if s.tasks is not None or s.run_state in RUN_DONE]
    for before, after in zip(answered, answered[1:], strict=False):
        if after.t >= fault_over_at and progressed(before, after, task):
            return round(after.t - injected_at, 2)
    return None
