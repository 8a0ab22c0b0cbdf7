"""Doing the faults of :mod:`scripts.chaos.table` to the local stack, and undoing them.

Every stack daemon is a supervisord program (``make status`` lists them), so a fault is an
XML-RPC call or a signal: ``kill_tree`` SIGKILLs a program and every process below it and lets
supervisord restart it (``autorestart=unexpected``), as a crashed host would; ``outage`` stops a
program for a while and starts it again; ``kill_task`` SIGKILLs the one process running a task
instance (Airflow's task runner titles itself ``airflow worker -- <ti id>``).

An :class:`Injection` acts at once in :meth:`Injection.start` and then waits, in a thread, for
the fault to be over; the observer reads :attr:`Injection.over_at` and never blocks on it.
:meth:`Injection.restore` puts a stopped program back whatever happened (Ctrl-C included).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.chaos.table import TrialSpec
from scripts.localstack.__main__ import supervisor
from tests.e2e.helpers import descendants, kill_pids, kill_tree, wait_running


def task_process(ti_id: str) -> int | None:
    """The pid of the process running task instance ``ti_id``, if one runs on this machine."""
    title = f"airflow worker -- {ti_id}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip() == title:
                return int(proc.name)
        except OSError:
            continue
    return None


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

    def start(self, ti_id: str | None = None) -> bool:
        """Inject now; ``False`` when there was nothing to hit (no task process to kill).

        :param ti_id: the phase task's instance id (``kill_task``).
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
        raise ValueError(f"unknown fault kind {kind!r}")

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
