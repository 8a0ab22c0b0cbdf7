"""The chaos suite as data: which faults exist, at which phases of a ``train_model`` run they are
injected, and when inside a phase. Pure module: nothing here touches the stack.

A trial is one (fault, phase) pair on one fresh run. The harness waits until the run enters the
phase, sleeps a random delay drawn from the phase's (or the fault's anchor's) window, and injects.
Adding a fault or a phase is a row here; the injector (:mod:`scripts.chaos.inject`) only knows
the fault *kinds*.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: What an injector does: kill -9 a supervised program with its descendants; kill -9 the phase
#: task's own process; stop a supervised program for a while, then start it again; restart one
#: (stop, start); crash the compute node (slurmd, the job's steps and container) and keep it down;
#: preempt the training with urgent jobs; trigger a second run of the same DAG; clear the task.
FaultKind = Literal["kill_tree", "kill_task", "outage", "restart", "node_fail", "preempt", "concurrent", "clear"]

#: Where inside a phase the delay counts from: the phase's task state first seen; the training's
#: job RUNNING in squeue; its attempt past start-up (``attempts.json``: training); the job
#: leaving RUNNING (its end). ``sbatch``: the task frozen the moment ``sbatch`` runs, so that the
#: kill lands between the submission and the ``slurm_job`` XCom write (kill-task at submit).
Anchor = Literal["state", "job_start", "training", "job_end", "sbatch"]

#: Conf of a training long enough to fault mid-stream, preemptible (partition ``spot``).
LONG_TRAINING: dict[str, Any] = {"max_epochs": 60, "partition": "spot", "mem": "2048M"}


@dataclass(frozen=True)
class Phase:
    """A stretch of a run, recognised from the task instances' states.

    :param name: short name used in the table and on the command line.
    :param task_id: the task whose state marks the phase.
    :param states: states of that task that mean "in the phase".
    :param delay: seconds after the anchor within which the fault lands (uniform).
    :param conf: run conf this phase needs (e.g. a training long enough to fault mid-stream).
    :param what: what the product does in this phase (for the report).
    :param anchor: the moment the delay counts from (:data:`Anchor`).
    :param dag: the DAG whose run the trial drives (every phase but the nightly's: train_model).
    """

    name: str
    task_id: str
    states: tuple[str, ...]
    delay: tuple[float, float]
    what: str
    conf: dict[str, Any] = field(default_factory=dict)
    anchor: Anchor = "state"
    dag: str = "train_model"


@dataclass(frozen=True)
class Fault:
    """One fault the harness can inject.

    :param name: short name (``--faults``).
    :param kind: how it is injected (:data:`FaultKind`).
    :param target: the supervisord program (``kill_tree``, ``outage``, ``restart``, ``node_fail``).
    :param phases: the phases it is tried at.
    :param outage: how long the program (the node) stays down, seconds (uniform); for
        ``preempt``, how many preemptions (the bounds, inclusive).
    :param sbatch_anchor: at the ``submit`` phase, anchor on ``sbatch`` (see :data:`Anchor`).
    :param anchor_delay: the delay window after the ``sbatch`` anchor.
    :param promise: what a user can rely on when this fault happens (rendered in the report).
    """

    name: str
    kind: FaultKind
    target: str
    phases: tuple[str, ...]
    promise: str
    outage: tuple[float, float] | None = None
    sbatch_anchor: bool = False
    anchor_delay: tuple[float, float] = (0.0, 2.0)


PHASES: dict[str, Phase] = {p.name: p for p in (
    # with the image cached, build_image only asks the registry and is over in a second: like
    # catalog, its phase starts when it is scheduled, so the outage can begin before its first call
    Phase("build", "build_image", ("scheduled", "queued", "running"), (0.0, 1.0),
          "build_image checks the registry for the image of the training's content hash and builds "
          "and pushes it when missing"),
    Phase("submit", "train", ("running",), (0.0, 0.5),
          "the train task runs: exactly-once lookup (squeue + sacct by name), staging, sbatch, "
          "the `slurm_job` XCom write, deferral"),
    Phase("job-start", "train", ("running", "deferred"), (0.0, 1.0),
          "the job has just started: the training snapshots its Mongo query into the job directory",
          anchor="job_start"),
    Phase("deferred", "train", ("deferred",), (2.0, 20.0),
          "the train task is deferred: the triggerer polls Slurm and streams the job's log",
          conf=LONG_TRAINING),
    Phase("running", "train", ("deferred",), (2.0, 10.0),
          "the job is training (its attempt is past start-up), a checkpoint at every epoch",
          conf=LONG_TRAINING, anchor="training"),
    Phase("job-end", "train", ("deferred",), (0.0, 1.0),
          "the job has just ended: the controller and accounting record the end, the trigger "
          "reports it", anchor="job_end"),
    # register takes 1.5-2 s on the warm stack (bytecode, preloaded imports): a later fault missed it
    Phase("register", "register", ("running",), (0.0, 1.0),
          "the register task copies the results off the cluster and logs them to MLflow"),
    # catalog lasts about half a second: its phase starts when it is scheduled, so that a fault
    # can land before its first Mongo call as well as during it.
    Phase("catalog", "catalog", ("scheduled", "queued", "running"), (0.0, 0.6),
          "the catalog task records the run in MongoDB"),
    # nightly_retrain's own step: load the challenger and the champion through MLflow, score both
    # on the held-out documents, tag the decision, move the alias. Scheduled-anchored like catalog.
    Phase("evaluate", "evaluate_and_promote", ("scheduled", "queued", "running"), (0.0, 2.0),
          "nightly_retrain's evaluate_and_promote loads challenger and champion from the MLflow "
          "registry, scores both on the held-out data, tags the decision and moves the alias",
          dag="nightly_retrain"),
)}

_KILL_PHASES = ("submit", "deferred", "register")

FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("kill-scheduler", "kill_tree", "airflow-scheduler", _KILL_PHASES,
          "Under LocalExecutor the task processes die with the scheduler. A running task (submit, "
          "register) is reset by the restarted scheduler's orphan check and retried; a retried "
          "submit finds the job by its name and re-attaches, a retried register finds the MLflow "
          "run by its run key: one Slurm job, one model version, the run succeeds. A deferred task "
          "is not affected: the trigger keeps running in the triggerer."),
    Fault("kill-triggerer", "kill_tree", "airflow-triggerer", _KILL_PHASES,
          "The restarted triggerer picks the trigger up again and continues the log at the last byte "
          "it recorded: every job line once, the job never cancelled, the run succeeds."),
    Fault("kill-dag-processor", "kill_tree", "airflow-dag-processor", _KILL_PHASES,
          "Nothing a running training depends on: the run succeeds unchanged."),
    Fault("kill-api-server", "kill_tree", "airflow-api-server", _KILL_PHASES,
          "Task processes and the triggerer talk to the API server; while it is down they wait or "
          "retry, the trigger holds the log back rather than repeat it and cancels nothing. One job, "
          "every line once, the run succeeds."),
    Fault("kill-task", "kill_task", "", ("submit", "register", "catalog"),
          "The task process dies (between sbatch and writing its XCom, at submit): the retry looks "
          "the training up by name and re-attaches to the job it had submitted, no second job; a "
          "retried register or catalog finds its MLflow run and catalog document by the run key.",
          sbatch_anchor=True, anchor_delay=(0.0, 1.0)),
    Fault("stop-sshd", "outage", "sshd", ("submit", "deferred"),
          "The login node is unreachable: a task that needs it waits inside its try, backing off, "
          "for up to 150 s (`connect_patience`); after that the try fails and the retry looks the "
          "training up by name before it submits; a deferred trigger keeps retrying (no event, no "
          "cancel) for up to `failure_patience` (10 min), the job keeps running, and when sshd is "
          "back the wait resumes where it was; a longer outage ends the try with the cause and its "
          "retry adopts the same job.",
          outage=(15.0, 180.0)),
    Fault("restart-slurmctld", "restart", "slurmctld", ("deferred", "job-end"),
          "The controller restarts from its state files: the job keeps its id and runs on, the "
          "trigger's polls fail for a moment and are retried, the end is seen once it is back."),
    Fault("stop-slurmdbd", "outage", "slurmdbd", ("deferred", "job-end"),
          "No accounting (sacct) for a minute: the controller still answers for the job (squeue, "
          "scontrol, MinJobAge 60 s), the trigger waits for an answer it can trust rather than "
          "guess, and the run succeeds.",
          outage=(60.0, 60.0)),
    Fault("kill-slurmd", "node_fail", "slurmd", ("running",),
          "The compute node crashes (slurmd, the job's steps and its container killed) and stays "
          "down past SlurmdTimeout: Slurm marks the job NODE_FAIL and requeues it (JobRequeue=1); "
          "the same job id resumes from its last checkpoint on a node that is up (local2, or local1 "
          "once it is back), the trigger follows it: one job, at most one checkpoint interval of "
          "steps trained again.",
          outage=(75.0, 90.0)),
    Fault("preempt", "preempt", "", ("running",),
          "An urgent job preempts the spot training 1-3 times: the training checkpoints on the "
          "signal and exits 75, the batch script requeues it, the same job id resumes where it "
          "stopped (no steps trained again), the task follows it on its first try.",
          outage=(1, 3)),
    Fault("stop-mlflow", "outage", "mlflow", ("register", "evaluate"),
          "register (and the nightly evaluate_and_promote) waits for MLflow inside its try: MLflow's "
          "own request retries, 1 s doubling to 64 s, about 2 min in all; a longer outage fails the "
          "try and it is retried (4 retries, 15 s doubling to 2 min: slurmflow.retries). A retried "
          "register finds the MLflow run by its run key (one run, one model version); a retried "
          "evaluation tags the same decision again and moves the alias at most once.",
          outage=(30.0, 120.0)),
    Fault("stop-mongo", "outage", "mongo", ("job-start", "catalog"),
          "catalog fails while Mongo is down and is retried (as register); the document is upserted by run key: "
          "one document with the full history. A training that cannot read its data fails cleanly "
          "and the task's retry submits a new job once the first has ended (no overlap).",
          outage=(30.0, 120.0)),
    Fault("stop-registry", "outage", "registry", ("build",),
          "build_image cannot reach the registry: it fails its try and the retry builds or finds "
          "the image once the registry is back; nothing is submitted meanwhile.",
          outage=(15.0, 60.0)),
    Fault("second-run", "concurrent", "", ("submit", "deferred", "register"),
          "A second run of the same DAG with the same conf, started mid-run: two trainings with "
          "their own keys, one job each, two model versions, both runs succeed."),
    Fault("clear", "clear", "", ("deferred",),
          "A manual clear of the deferred train task means run again: the running job is "
          "cancelled, a new generation is submitted once it is, and the run succeeds with the "
          "second job's result; never two jobs live at once."),
)}

#: Faults and phases of issue 11 this harness does not inject yet (rendered in the report).
NOT_COVERED: tuple[str, ...] = (
    "two runs at once and a clear at every phase (second-run is tried at submit, deferred and "
    "register; clear at the deferred wait)",
)


@dataclass(frozen=True)
class TrialSpec:
    """One planned trial: a fault at a phase, the ``index``-th of its pair."""

    fault: Fault
    phase: Phase
    index: int

    @property
    def anchor(self) -> Anchor:
        """Where the delay counts from."""
        return "sbatch" if self.fault.sbatch_anchor and self.phase.name == "submit" else self.phase.anchor

    def delay(self, rng: random.Random) -> float:
        """The injection delay after the anchor, drawn inside the window."""
        low, high = self.fault.anchor_delay if self.anchor == "sbatch" else self.phase.delay
        return rng.uniform(low, high)

    def outage(self, rng: random.Random) -> float | None:
        """How long an outage lasts (``None`` for kills); for ``preempt``, how many times."""
        if not self.fault.outage:
            return None
        if self.fault.kind == "preempt":
            return float(rng.randint(int(self.fault.outage[0]), int(self.fault.outage[1])))
        return rng.uniform(*self.fault.outage)


def select_faults(names: Iterable[str] | None) -> list[Fault]:
    """The faults named (all when ``names`` is empty); an unknown name lists the valid ones."""
    names = [n for n in (names or []) if n]
    if not names:
        return list(FAULTS.values())
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; valid: {', '.join(FAULTS)}")
    return [FAULTS[n] for n in names]


def plan(faults: Iterable[Fault], trials: int, phases: Iterable[str] | None = None) -> list[TrialSpec]:
    """Every (fault, phase) pair ``trials`` times, interleaved (round 1 of every pair, then round
    2...) so that a run cut short still covers every pair evenly.

    :param phases: only these phases (all of each fault's when empty).
    """
    wanted = set(phases or [])
    unknown = wanted - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phase(s) {', '.join(sorted(unknown))}; valid: {', '.join(PHASES)}")
    pairs = [(f, PHASES[p]) for f in faults for p in f.phases if not wanted or p in wanted]
    return [TrialSpec(f, p, i) for i in range(trials) for f, p in pairs]


def fewest_first(specs: list[TrialSpec], done: Iterable[Mapping[str, Any]]) -> list[TrialSpec]:
    """The same trials, each pair's rounds counted on from the trials already recorded for it
    (those whose fault landed in its phase), lowest round first: an appended run fills the pairs
    with the fewest trials before it adds to the others."""
    have = Counter((t["fault"], t["phase"]) for t in done if t.get("phase_hit"))
    return sorted(specs, key=lambda s: have[(s.fault.name, s.phase.name)] + s.index)
