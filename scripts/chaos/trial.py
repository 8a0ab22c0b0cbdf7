"""One trial: trigger a ``train_model`` run, wait for the phase, inject the fault at a random
moment inside it, follow the run to its end, and record what happened.

The record (a plain dict, one entry of ``bench/results/chaos.json``):

- ``outcome``: the run's state (``success``/``failed``), or ``lost`` when it did not finish
  within ``run_timeout`` (the harness then marks it failed so the stack is free again);
- ``slurm_jobs``: every job Slurm ran for the training's key (sacct + squeue by the key's
  digest, any generation), ``duplicates`` = how many beyond the first;
- ``orphans``: the key's jobs still queued or running ``orphan_wait`` seconds after the run
  ended (filled in later by :func:`check_orphans`; ``None`` until then);
- ``recovery_s``: from the injection to the first progress once the fault is over
  (:func:`scripts.chaos.phases.recovery_s`);
- ``lines``: the lines streamed into the train task's trigger logs against the job's log;
- ``secrets_found``: which credential (by name) appeared in which log;
- ``phase_at_injection`` / ``phase_hit``: where the run really was when the fault landed.
"""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import time
from typing import Any

from scripts.airflow_api import AirflowAPI
from scripts.chaos import observe
from scripts.chaos.inject import Injection
from scripts.chaos.observe import DAG, answer
from scripts.chaos.phases import RUN_DONE, Sample, detect_phase, in_phase, recovery_s
from scripts.chaos.table import TrialSpec
from slurmflow.identity import XCOM_JOB_KEY, JobKey


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Trial:
    """:param api: the stack's REST client; :param secrets: credentials to scan logs for;
    :param run_timeout: seconds after which a run that has not ended is ``lost``."""

    def __init__(self, api: AirflowAPI, spec: TrialSpec, rng: random.Random, secrets: dict[str, str],
                 run_timeout: float = 900, phase_timeout: float = 600) -> None:
        self.api, self.spec, self.rng, self.secrets = api, spec, rng, secrets
        self.run_timeout, self.phase_timeout = run_timeout, phase_timeout
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.injection: Injection | None = None
        #: what has been recorded so far (kept when the harness itself fails mid-trial)
        self.record: dict[str, Any] = {"fault": spec.fault.name, "phase": spec.phase.name, "trial": spec.index}

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def look(self, run_id: str) -> Sample:
        s = observe.sample(self.api, run_id, self.clock())
        self.samples.append(s)
        return s

    def run(self) -> dict[str, Any]:
        spec = self.spec
        conf = {"model_name": f"chaos-{spec.fault.name}", **spec.phase.conf}
        started = time.time()
        run_id = self.api.trigger(DAG, conf=conf)["dag_run_id"]
        key = JobKey(DAG, run_id, "train")
        record = self.record
        record.update(run_id=run_id, conf=conf, started_at=_now(), training_key=key.digest)
        try:
            injection = self._inject(run_id, key, record)
            end = self._follow(run_id)
        finally:
            if self.injection is not None:  # a stopped program is started again, whatever happened
                self.injection.restore()
        if injection is not None:
            injection.wait_over()
            record["fault_detail"] = injection.detail
            if injection.injected_at is not None:
                record["fault_over_s"] = (round(injection.over_at - injection.injected_at, 2)
                                          if injection.over_at is not None else None)
                record["recovery_s"] = recovery_s(self.samples, injection.injected_at,
                                                  injection.over_at if injection.over_at is not None else 1e12)
        self._outcome(run_id, key, started, end, record)
        return record

    # --- before: the phase, the anchor, the delay, the injection ---------------------------------

    def _inject(self, run_id: str, key: JobKey, record: dict[str, Any]) -> Injection | None:
        spec, phase = self.spec, self.spec.phase
        while True:
            s = self.look(run_id)
            if in_phase(phase, s.tasks):
                break
            if s.run_state in RUN_DONE or self.clock() > self.phase_timeout:
                record.update(phase_hit=False, phase_at_injection=detect_phase(s.tasks, s.run_state),
                              fault_detail={"missed": f"the run never reached phase {phase.name}"})
                return None
            time.sleep(0.2)
        record["phase_entered_s"] = round(self.clock(), 2)
        ti = answer(self.api.get, f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{phase.task_id}") or {}
        anchor = self.clock()
        if spec.fault.anchor == "sbatch":
            anchor = self._wait_job_visible(run_id, key, phase.task_id)
            record["job_visible_s"] = round(anchor, 2) if anchor is not None else None
            if anchor is None:
                record.update(phase_hit=False, phase_at_injection=detect_phase(self.samples[-1].tasks),
                              fault_detail={"missed": "the task left the phase before its job showed in squeue"})
                return None
        delay = spec.delay(self.rng)
        time.sleep(max(0.0, anchor + delay - self.clock()))
        record["delay_s"] = round(delay, 2)
        injection = self.injection = Injection(spec, self.clock, spec.outage(self.rng))
        if spec.fault.kind == "kill_task":
            # no look first (it takes longer than the window); a process running the phase's
            # task instance is the proof that the task was in the phase
            hit = injection.start(ti.get("id"))
            where = phase.name if hit else detect_phase(self.look(run_id).tasks)
        else:
            s = self.look(run_id)  # just before: once the api-server is the fault, nothing answers
            where = detect_phase(s.tasks, s.run_state)
            hit = injection.start(ti.get("id"))
        record["phase_at_injection"] = where
        record["phase_hit"] = hit and where == phase.name
        record["injected_at_s"] = round(injection.injected_at, 2) if injection.injected_at else None
        if spec.fault.kind == "kill_task":
            # the killed process cannot write any more: what is in XCom now was written before
            record["xcom_written_before_kill"] = answer(self.api.xcom, DAG, run_id, phase.task_id,
                                                        key=XCOM_JOB_KEY) is not None
        if not hit:
            record["fault_detail"] = injection.detail
            return None
        return injection

    def _wait_job_visible(self, run_id: str, key: JobKey, task_id: str) -> float | None:
        """The trial clock when the key's job first shows in squeue, while ``task_id`` still runs."""
        last_look = 0.0
        while True:
            try:
                if observe.live_jobs_of_key(key.digest):
                    return self.clock()
            except (OSError, subprocess.SubprocessError):
                pass  # the controller is busy: ask again
            if self.clock() - last_look > 1.0:  # the API is slower than squeue: ask it less often
                last_look = self.clock()
                s = self.look(run_id)
                if s.tasks and s.tasks.get(task_id, (None, 0))[0] != "running":
                    return None
            time.sleep(0.03)

    # --- after: follow, then record -----------------------------------------------------------

    def _follow(self, run_id: str) -> Sample | None:
        """Sample the run until it ends; ``None`` if it did not within ``run_timeout``."""
        while self.clock() < self.run_timeout:
            s = self.look(run_id)
            if s.run_state in RUN_DONE:
                return s
            time.sleep(0.5)
        return None

    def _outcome(self, run_id: str, key: JobKey, started: float, end: Sample | None, record: dict[str, Any]) -> None:
        if end is None:
            record.update(outcome="lost", lost=True)
            # free the stack for the next trial: marking the run failed kills its tasks (which cancel)
            answer(self.api.patch, f"/dags/{DAG}/dagRuns/{run_id}", {"state": "failed"})
        else:
            record.update(outcome=end.run_state, lost=False)
        record["run_s"] = round(self.clock(), 1)
        record["ended_at_epoch"] = time.time()
        final = self.samples[-1].tasks or {}
        record["tasks"] = {task: {"state": state, "tries": tries} for task, (state, tries) in final.items()}
        job = answer(self.api.xcom, DAG, run_id, "train", key=XCOM_JOB_KEY)
        record["slurm_job"] = {k: job.get(k) for k in ("job_id", "job_name", "log_path", "job_dir")} if job else None
        jobs = self._jobs(key, started)
        record["slurm_jobs"] = [{"job_id": j, **v} for j, v in sorted(jobs.items())]
        record["duplicates"] = max(0, len(jobs) - 1)
        record["orphans"] = None
        record["lines"] = observe.stream_check(run_id, job)
        found = observe.find_secrets(observe.run_log_texts(run_id, job), self.secrets)
        record["secrets_found"] = found
        record["samples"] = len(self.samples)


    @staticmethod
    def _jobs(key: JobKey, started: float) -> dict[str, dict[str, str]]:
        last: Exception | None = None
        for wait in (2, 5, 10):  # slurmdbd records a job's end a moment after the controller
            time.sleep(wait)
            try:
                return observe.jobs_of_key(key.digest, started - 60)
            except (OSError, subprocess.SubprocessError) as exc:
                last = exc
        raise RuntimeError(f"Slurm did not answer for key {key.digest}: {last}")


def check_orphans(record: dict[str, Any], orphan_wait: float) -> bool:
    """Fill in ``orphans`` once ``orphan_wait`` seconds passed since the run ended; ``True`` when done."""
    if record.get("orphans") is not None or "ended_at_epoch" not in record:
        return True
    waited = time.time() - record["ended_at_epoch"]
    if waited < orphan_wait:
        return False
    live = observe.live_jobs_of_key(record["training_key"])
    record["orphans"] = [{"job_id": j, **v} for j, v in sorted(live.items())]
    record["orphans_checked_after_s"] = round(waited, 1)
    return True
