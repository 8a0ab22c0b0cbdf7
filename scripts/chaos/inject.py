"""Doing the faults of :mod:`scripts.chaos.table` to the local stack, and undoing them.

Every stack daemon is a supervisord program (``make status`` lists them), so a fault is an
XML-RPC call or a signal: ``kill_tree`` SIGKILLs a program and every process below it and lets
supervisord restart it (``autorestart=unexpected``), as a crashed host would; ``outage`` stops a
program for a while and starts it again; ``restart`` stops and starts it at once;
``kill_task`` SIGKILLs the one process running a task instance (Airflow's task runner titles
itself ``airflow worker -- <ti id>``); ``node_fail`` crashes the compute node: slurmd stopped,
every job step (``slurmstepd``) and job container SIGKILLed, slurmd started again after the
outage; ``preempt`` submits urgent jobs that need the training's memory, one per preemption.

An :class:`Injection` acts at once in :meth:`Injection.start` and then waits, in a thread, for
the fault to be over; the observer reads :attr:`Injection.over_at` and never blocks on it.
:meth:`Injection.restore` puts a stopped program back whatever happened (Ctrl-C included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.chaos import observe
from scripts.chaos.table import TrialSpec
from scripts.localstack.__main__ import supervisor
from tests.e2e.helpers import descendants, kill_pids, kill_tree, wait_running

#: The label the docker runtime puts on a job's container (slurmflow.runtimes).
JOB_LABEL = "slurmflow.slurm_job_id"


def task_title(ti_id: str) -> bytes:
    """The command line Airflow's task runner gives itself for task instance ``ti_id``."""
    return f"airflow worker -- {ti_id}".encode()


def task_process(ti_id: str) -> int | None:
    """The pid of the process running task instance ``ti_id``, if one runs on this machine."""
    title = task_title(ti_id)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip() == title:
                return int(proc.name)
        except OSError:
            continue
    return None


def processes_named(name: str) -> list[int]:
    """Pids whose command name (``/proc/<pid>/comm``) starts with ``name``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().startswith(name):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def same_network_namespace(pid: int) -> bool:
    """The process shares this one's network namespace (runs on local1, not on local2)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


#: What the remote submission runs as (``slurmflow.commands.submit_once``): squeue, then sbatch.
SUBMIT_MARK = b"slurmflow-submit"


def may_change(cmdline: bytes) -> bool:
    """Whether a process's command line may still change, so a scan must look at it again: an
    Airflow process retitles itself, and sshd's session child reads ``sshd: ...`` between its fork
    and its exec of the remote command (same pid), then empty while it execs -- on a loaded machine
    a scan lands in those gaps (CI missed a submission so). Kernel threads stay empty: a few dozen
    cheap re-reads."""
    return not cmdline or b"airflow" in cmdline or cmdline.startswith(b"sshd")


def freeze_at(marker: bytes, ti_id: str, timeout: float) -> int | None:
    """SIGSTOP the process running task instance ``ti_id`` (and its descendants) the moment a
    process whose command line holds ``marker`` runs anywhere (the remote submission runs on
    this machine, under sshd); the marked process's pid, or ``None`` if nothing ran within
    ``timeout``.

    The submission goes on without the task; once it is over, a kill of the frozen task lands
    exactly between the job's submission and the task reading sbatch's answer (its XCom write).
    Watching starts before the task does, and only pids not seen before are read, so that a
    scan is quick enough to catch a submission that takes a tenth of a second."""
    title = task_title(ti_id)
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    task: int | None = None
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit() or name in seen:
                continue
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                seen.add(name)
                continue
            if not may_change(cmdline):
                seen.add(name)
            if cmdline.replace(b"\0", b" ").strip() == title:
                task = int(name)
            elif marker in cmdline:
                task = task if task is not None else task_process(ti_id)  # retitled after our look
                if task is None:
                    return None
                for victim in [task, *descendants(task)]:
                    try:
                        os.kill(victim, signal.SIGSTOP)
                    except ProcessLookupError:
                        pass
                return int(name)
        time.sleep(0.001)
    return None


def job_containers() -> list[str]:
    """Ids of the running containers of Slurm jobs (the docker runtime labels them)."""
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label={JOB_LABEL}"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return out.split()


class Injection:
    """One fault of a trial.

    :param spec: the trial (its fault says what to do).
    :param clock: seconds since the trial started (the observer's clock).
    :param outage_s: how long an ``outage`` lasts.
    """

    def __init__(self, spec: TrialSpec, clock: Callable[[], float], outage_s: float | None = None) -> None:
        self.fault = spec.fault
        self.clock = clock
        self.outage_s = outage_s
        self.injected_at: float | None = None
        self.over_at: float | None = None
        self.detail: dict[str, Any] = {}
        self._stopped = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, ti_id: str | None = None, job: dict[str, Any] | None = None) -> bool:
        """Inject now; ``False`` when there was nothing to hit (no task process to kill).

        :param ti_id: the phase task's instance id (``kill_task``).
        :param job: the training's ``slurm_job`` XCom (``preempt``).
        """
        kind = self.fault.kind
        if kind == "kill_task":
            pid = task_process(ti_id or "")
            if pid is None:
                self.detail["missed"] = f"no process runs task instance {ti_id}"
                return False
            victims = [pid, *descendants(pid)]
            kill_pids(victims)
            self.injected_at = self.over_at = self.clock()
            self.detail["killed_pids"] = victims
            return True
        if kind == "kill_tree":
            old = kill_tree(self.fault.target)
            self.injected_at = self.clock()
            self.detail["killed_pid"] = old
            self._background(self._wait_restart, old)
            return True
        if kind == "outage":
            sup = supervisor()
            pid = sup.getProcessInfo(self.fault.target)["pid"]
            sessions = descendants(pid) if pid else []
            sup.stopProcess(self.fault.target)
            self._stopped = True
            self.injected_at = self.clock()
            # sshd's per-connection processes outlive the listener: a login node that is down
            # drops its open sessions too, or the trigger's one SSH connection would not notice.
            alive = [p for p in sessions if Path(f"/proc/{p}").exists()]
            kill_pids(alive)
            self.detail.update(outage_s=round(self.outage_s or 0, 1), sessions_dropped=len(alive))
            self._background(self._end_outage)
            return True
        if kind == "restart":
            sup = supervisor()
            self.injected_at = self.clock()
            sup.stopProcess(self.fault.target)
            sup.startProcess(self.fault.target)  # returns once it ran for startsecs
            self.over_at = self.clock()
            self.detail["new_pid"] = sup.getProcessInfo(self.fault.target)["pid"]
            return True
        if kind == "node_fail":
            sup = supervisor()
            self.injected_at = self.clock()
            sup.stopProcess(self.fault.target)  # first, so that it cannot report the steps' deaths
            self._stopped = True
            # local1's steps only: local2's slurmstepd live in its network namespace (localstack/nodes.py)
            steps = [pid for pid in processes_named("slurmstepd") if same_network_namespace(pid)]
            victims = [v for step in steps for v in (step, *descendants(step))]
            kill_pids(victims)
            containers = job_containers()
            if containers:
                subprocess.run(["docker", "kill", *containers], capture_output=True, timeout=60)
            self.detail.update(outage_s=round(self.outage_s or 0, 1), steps_killed=len(steps),
                               processes_killed=len(victims), containers_killed=len(containers))
            self._background(self._end_outage)
            return True
        if kind == "preempt":
            if not job:
                self.detail["missed"] = "no slurm_job XCom to preempt"
                return False
            self.injected_at = self.clock()
            self._background(self._preempt, job, int(self.outage_s or 1))
            return True
        raise ValueError(f"unknown fault kind {kind!r}")

    def _preempt(self, job: dict[str, Any], times: int) -> None:
        """Preempt the training ``times`` times, each once its attempt trains again."""
        job_id = str(job["job_id"])
        urgent: list[str] = []
        try:
            for restart in range(times):
                if restart and not wait_for(lambda r=restart: observe.attempt_training(job["job_dir"], r), 300):
                    self.detail["stopped"] = f"attempt {restart} never trained"
                    break
                urgent.append(observe.submit_urgent())
                if not wait_for(lambda r=restart: observe.restarts(job_id) > r, 120):
                    self.detail["stopped"] = f"job {job_id} not requeued by urgent job {urgent[-1]}"
                    break
        finally:
            self.detail.update(preemptions=len(urgent), urgent_jobs=urgent)
            self.over_at = self.clock()

    def _background(self, target: Callable[..., None], *args: Any) -> None:
        self._thread = threading.Thread(target=target, args=args, daemon=True, name=f"chaos-{self.fault.name}")
        self._thread.start()

    def _wait_restart(self, old_pid: int) -> None:
        try:
            info = wait_running(self.fault.target, old_pid, timeout=120)
            self.detail["new_pid"] = info["pid"]
        except TimeoutError:
            # supervisord gave up (FATAL): start it ourselves, and say so
            supervisor().startProcess(self.fault.target)
            self.detail["restarted_by_harness"] = True
        self.over_at = self.clock()

    def _end_outage(self) -> None:
        time.sleep(self.outage_s or 0)
        self.restore()

    def restore(self) -> None:
        """Start a stopped program again (idempotent); the fault is over once it runs."""
        with self._lock:  # the outage's thread and a Ctrl-C may both get here
            if not self._stopped:
                return
            sup = supervisor()
            if sup.getProcessInfo(self.fault.target)["statename"] != "RUNNING":
                sup.startProcess(self.fault.target)  # returns once it ran for startsecs
            self._stopped = False
            self.over_at = self.clock()

    def wait_over(self, timeout: float = 180) -> None:
        """Block until the fault is over (the background thread finished)."""
        if self._thread is not None:
            self._thread.join(timeout)


def wait_for(check: Callable[[], Any], timeout: float, every: float = 0.5) -> bool:
    """Poll ``check`` until it is true (errors count as false); ``False`` at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            pass
        time.sleep(every)
    return False
