"""One trial: trigger a ``train_model`` run, wait for the phase, inject the fault at a random
moment inside it, follow the run to its end, and record what happened.

The record (a plain dict, one entry of ``bench/results/chaos.json``):

- ``outcome``: the run's state (``success``/``failed``), or ``lost`` when it did not finish
  within ``run_timeout`` (the harness then marks it failed so the stack is free again);
- ``slurm_jobs``: every job Slurm ran for the training's key (sacct + squeue by the key's
  digest, any generation); ``duplicates``: those that should not exist
  (:func:`scripts.chaos.observe.duplicate_jobs`: submitted while an earlier one was live, or
  after one of the same generation completed);
- ``registrations``: MLflow runs, model versions and catalog documents of the run, per
  generation; ``duplicate_registrations``: beyond one of each per generation;
- ``attempts``: the job's attempts and the steps trained twice (``steps_redone``);
- ``second_run``: for ``concurrent``, the same figures for the second run (folded into the
  trial's own: the trial holds only if both runs did);
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
from pathlib import Path
from typing import Any

from scripts.airflow_api import AirflowAPI
from scripts.chaos import observe
from scripts.chaos.inject import SUBMIT_MARK, Injection, freeze_at, wait_for
from scripts.chaos.observe import answer
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
        self.dag = spec.phase.dag
        self.run_timeout, self.phase_timeout = run_timeout, phase_timeout
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.injection: Injection | None = None
        #: the second run of a ``concurrent`` fault: (run id, epoch it was triggered)
        self.second: tuple[str, float] | None = None
        #: what has been recorded so far (kept when the harness itself fails mid-trial)
        self.record: dict[str, Any] = {"fault": spec.fault.name, "phase": spec.phase.name, "trial": spec.index}

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def look(self, run_id: str) -> Sample:
        s = observe.sample(self.api, run_id, self.clock(), self.dag)
        self.samples.append(s)
        return s

    def run(self) -> dict[str, Any]:
        spec = self.spec
        conf = {"model_name": f"chaos-{spec.fault.name}", **spec.phase.conf}
        started = time.time()
        run_id = self.api.trigger(self.dag, conf=conf)["dag_run_id"]
        key = JobKey(self.dag, run_id, "train")
        record = self.record
        record.update(run_id=run_id, conf=conf, started_at=_now(), training_key=key.digest)
        try:
            injection = self._inject(run_id, key, record)
            end = self._follow(run_id)
            second_end = self._follow(self.second[0]) if self.second else None
        finally:
            if self.injection is not None:  # a stopped program is started again, whatever happened
                self.injection.restore()
        if injection is not None:
            injection.wait_over()
            record["fault_detail"] = injection.detail
            if injection.injected_at is not None:
                record["fault_over_s"] = (round(injection.over_at - injection.injected_at, 2)
                                          if injection.over_at is not None else None)
                # a killed task's recovery is its own retry, not a task that runs beside it
                focus = self.spec.phase.task_id if self.spec.fault.kind == "kill_task" else None
                record["recovery_s"] = recovery_s(self.samples, injection.injected_at,
                                                  injection.over_at if injection.over_at is not None else 1e12,
                                                  focus)
        record.update(self._outcome(run_id, key, started, end, conf))
        if self.second:
            other_id, other_started = self.second
            other = self._outcome(other_id, JobKey(self.dag, other_id, "train"), other_started, second_end, conf)
            record["second_run"] = other
            # the trial holds only if both runs kept every promise: fold the second run's figures in
            if other["outcome"] != "success":
                record["outcome"] = f"second run {other['outcome']}"
            record["lost"] = record["lost"] or other["lost"]
            record["duplicates"] += other["duplicates"]
            record["duplicate_registrations"] += other["duplicate_registrations"]
            record["secrets_found"] += other["secrets_found"]
        record["run_s"] = round(self.clock(), 1)
        record["ended_at_epoch"] = time.time()
        return record

    # --- before: the phase, the anchor, the delay, the injection ---------------------------------

    def _inject(self, run_id: str, key: JobKey, record: dict[str, Any]) -> Injection | None:
        spec, phase = self.spec, self.spec.phase
        if spec.anchor == "sbatch":
            # the submission takes a tenth of a second: watch for it from before the task starts
            ti = self._task_instance(run_id, phase.task_id)
            anchor = self._freeze_at_sbatch(ti.get("id") or "")
            record["phase_entered_s"] = anchor
        else:
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
            ti = self._task_instance(run_id, phase.task_id)
            anchor = self.clock() if spec.anchor == "state" else self._wait_job(run_id, key, spec.anchor)
        record["anchor"], record["anchor_s"] = spec.anchor, round(anchor, 2) if anchor is not None else None
        if anchor is None:
            record.update(phase_hit=False, phase_at_injection=detect_phase(self.look(run_id).tasks),
                          fault_detail={"missed": f"the {spec.anchor} anchor never came inside the phase"})
            return None
        delay = spec.delay(self.rng)
        time.sleep(max(0.0, anchor + delay - self.clock()))
        record["delay_s"] = round(delay, 2)
        injection = self.injection = Injection(spec, self.clock, spec.outage(self.rng))
        kind = spec.fault.kind
        if kind == "kill_task":
            # no look first (it takes longer than the window); a process running the phase's
            # task instance is the proof that the task was in the phase
            hit = injection.start(ti.get("id"))
            where = phase.name if hit else detect_phase(self.look(run_id).tasks)
        else:
            s = self.look(run_id)  # just before: once the api-server is the fault, nothing answers
            where = detect_phase(s.tasks, s.run_state)
            if kind == "concurrent":
                hit = self._second_run(injection, record)
            elif kind == "clear":
                hit = self._clear(injection, run_id, phase.task_id)
            else:
                job = answer(self.api.xcom, self.dag, run_id, "train", key=XCOM_JOB_KEY)
                hit = injection.start(ti.get("id"), job=job)
        record["phase_at_injection"] = where
        # a job anchor is only reached inside the phase's task states: the anchor says where
        record["phase_hit"] = hit and (where == phase.name or spec.anchor != "state")
        record["injected_at_s"] = round(injection.injected_at, 2) if injection.injected_at else None
        if kind == "kill_task":
            # the killed process cannot write any more: what is in XCom now was written before
            record["xcom_written_before_kill"] = answer(self.api.xcom, self.dag, run_id, phase.task_id,
                                                        key=XCOM_JOB_KEY) is not None
        if not hit:
            record["fault_detail"] = injection.detail
            return None
        return injection

    def _task_instance(self, run_id: str, task_id: str) -> dict[str, Any]:
        """The task instance (its id names its process); waits for the API to answer."""
        for _ in range(100):
            ti = answer(self.api.get, f"/dags/{self.dag}/dagRuns/{run_id}/taskInstances/{task_id}")
            if ti:
                return ti
            time.sleep(1)
        return {}

    def _freeze_at_sbatch(self, ti_id: str) -> float | None:
        """Freeze the task process the moment its remote submission starts, then wait until
        that submission is over: the trial clock then, or ``None`` if it never came."""
        submitter = freeze_at(SUBMIT_MARK, ti_id, timeout=300)
        if submitter is None:
            return None
        if not wait_for(lambda: not Path(f"/proc/{submitter}").exists(), 60, every=0.02):
            return None
        return self.clock()

    def _wait_job(self, run_id: str, key: JobKey, anchor: str) -> float | None:
        """The trial clock when the training's job reaches ``anchor`` (``job_start``: RUNNING;
        ``training``: its first attempt past start-up; ``job_end``: no longer RUNNING), while the
        run is still in the phase's task states."""
        job: dict[str, Any] | None = None
        last_look = 0.0
        while self.clock() < self.phase_timeout:
            try:
                live = observe.live_jobs_of_key(key.digest)
                state = next(iter(live.values()))["state"] if live else None
                if anchor == "job_start" and state == "RUNNING":
                    return self.clock()
                if anchor == "job_end" and state not in (None, "RUNNING", "PENDING", "CONFIGURING"):
                    return self.clock()
                if anchor == "job_end" and state is None and job:
                    return self.clock()  # gone from squeue between two looks
                if anchor == "training" and job and observe.attempt_training(job["job_dir"], 0):
                    return self.clock()
                if state == "RUNNING" and job is None:
                    job = answer(self.api.xcom, self.dag, run_id, "train", key=XCOM_JOB_KEY)
            except (OSError, subprocess.SubprocessError):
                pass  # the controller is busy: ask again
            if self.clock() - last_look > 1.0:  # the API is slower than squeue: ask it less often
                last_look = self.clock()
                s = self.look(run_id)
                if s.run_state in RUN_DONE or not in_phase(self.spec.phase, s.tasks):
                    return None
            time.sleep(0.05)
        return None

    def _second_run(self, injection: Injection, record: dict[str, Any]) -> bool:
        """Trigger a second run with the same conf now (the fault of ``concurrent``)."""
        created = answer(self.api.trigger, self.dag, conf=record["conf"])
        injection.injected_at = injection.over_at = self.clock()
        if not created:
            injection.detail["missed"] = "the API refused the second run"
            return False
        self.second = (created["dag_run_id"], time.time())
        injection.detail["second_run"] = created["dag_run_id"]
        return True

    def _clear(self, injection: Injection, run_id: str, task_id: str) -> bool:
        """Clear the phase's task as a user would (the Clear button: downstream included)."""
        injection.injected_at = injection.over_at = self.clock()
        cleared = answer(self.api.post, f"/dags/{self.dag}/clearTaskInstances",
                         {"dry_run": False, "only_failed": False, "task_ids": [task_id], "include_downstream": True,
                          "dag_run_id": run_id, "reset_dag_runs": True})
        if cleared is None:
            injection.detail["missed"] = "the API refused the clear"
            return False
        injection.detail["cleared"] = [t.get("task_id") for t in cleared.get("task_instances", [])]
        return True

    # --- after: follow, then record -----------------------------------------------------------

    def _follow(self, run_id: str) -> Sample | None:
        """Sample the run until it ends; ``None`` if it did not within ``run_timeout``."""
        while self.clock() < self.run_timeout:
            s = self.look(run_id)
            if s.run_state in RUN_DONE:
                return s
            time.sleep(0.5)
        return None

    def _outcome(self, run_id: str, key: JobKey, started: float, end: Sample | None,
                 conf: dict[str, Any]) -> dict[str, Any]:
        """What one run left behind: its state, tasks, Slurm jobs, registrations, lines, secrets."""
        out: dict[str, Any] = {"run_id": run_id}
        if end is None:
            out.update(outcome="lost", lost=True)
            # free the stack for the next trial: marking the run failed kills its tasks (which cancel)
            answer(self.api.patch, f"/dags/{self.dag}/dagRuns/{run_id}", {"state": "failed"})
        else:
            out.update(outcome=end.run_state, lost=False)
        final = observe.task_states(self.api, run_id, self.dag) or {}
        out["tasks"] = {task: {"state": state, "tries": tries} for task, (state, tries) in final.items()}
        job = answer(self.api.xcom, self.dag, run_id, "train", key=XCOM_JOB_KEY)
        out["slurm_job"] = {k: job.get(k) for k in ("job_id", "job_name", "log_path", "job_dir")} if job else None
        jobs = self._jobs(key, started)
        out["slurm_jobs"] = [{"job_id": j, **v} for j, v in sorted(jobs.items())]
        out["duplicate_job_ids"] = observe.duplicate_jobs(jobs)
        out["duplicates"] = len(out["duplicate_job_ids"])
        out["training_key"] = key.digest
        out["attempts"] = observe.steps_redone(observe.attempts(job["job_dir"])) if job else None
        try:
            out["registrations"] = observe.registrations(run_id, conf["model_name"], self.dag)
            out["duplicate_registrations"] = observe.duplicate_registrations(out["registrations"])
        except Exception as exc:  # MLflow or Mongo itself may be what broke: say so, count nothing
            out["registrations"], out["duplicate_registrations"] = {"error": repr(exc)}, 0
        out["lines"] = observe.stream_check(run_id, job, self.dag)
        out["secrets_found"] = observe.find_secrets(observe.run_log_texts(run_id, job, self.dag), self.secrets)
        out["samples"] = len(self.samples)
        return out

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
    live: dict[str, dict[str, Any]] = {}
    for key in [record["training_key"], *([record["second_run"]["training_key"]] if record.get("second_run") else [])]:
        live.update(observe.live_jobs_of_key(key))
    record["orphans"] = [{"job_id": j, **v} for j, v in sorted(live.items())]
    record["orphans_checked_after_s"] = round(waited, 1)
    return True
