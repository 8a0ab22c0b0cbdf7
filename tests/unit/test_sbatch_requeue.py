"""The rendered sbatch script asks Slurm for a requeue when the command exits 75 (checkpointed).

The batch script is the one owner of the requeue (hpctrain only checkpoints and exits 75). Runs
the real script with bash, a fake ``scontrol`` first on PATH recording its argv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from slurmflow.sbatch import build_script, render_script


@pytest.mark.parametrize("exit_code, requeued, script_status", [(75, True, 0), (3, False, 3), (0, False, 0)])
def test_exit_75_requeues_the_job(tmp_path, exit_code, requeued, script_status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    script = build_script(command=f"exit {exit_code}", job_name="t", job_dir=str(job_dir),
                          options={"signal": "B:USR2@60", "requeue": True})
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(script))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == script_status, out.stdout + out.stderr
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeued else [])


def signalled_job(tmp_path, command: str, ready=None, setup: str = "") -> tuple[int, str, list[str]]:
    """Run the rendered script of ``command``; send the batch shell SIGUSR2 once ``ready``
    exists (when ``None``: once the script printed its first line), as Slurm does at preemption
    (preempt_send_user_signal).
    Its exit status, its output and the argv of each fake ``scontrol`` call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    script = build_script(command=command, job_name="t", job_dir=str(job_dir), setup=setup,
                          options={"signal": "B:USR2@60", "requeue": True})
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(script))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = ""
        if ready is None:
            first = proc.stdout.readline()  # "[slurmflow] job 4242 start ...": the trap is set
        deadline = time.monotonic() + 20
        while ready is not None and not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=30)
        out = first + out
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, calls.read_text().split() if calls.exists() else []


def test_preemption_signal_reaches_the_command_which_checkpoints_and_the_script_requeues(tmp_path):
    """``--signal=B:USR2``: Slurm signals only the batch shell; it forwards the signal to the
    command's process group, the command (like hpctrain) stops with 75, the shell requeues."""
    ready = tmp_path / "ready"
    command = (f"trap 'echo checkpoint saved; exit 75' USR2; touch {ready}; "
               "for i in $(seq 1 300); do sleep 0.1; done; exit 0")
    status, out, calls = signalled_job(tmp_path, command, ready)
    assert status == 0, out
    assert "forwarding SIGUSR2" in out and "checkpoint saved" in out and "exit 75" in out
    assert calls == ["requeue", "4242"]


def test_a_signal_before_the_command_has_its_handler_requeues_too(tmp_path):
    """Regression: preempted during the image pull or the container's start (no handler yet), the
    command died of SIGUSR2 (exit 140) and the job ended FAILED. Nothing was lost since the last
    checkpoint: the batch script requeues it like a checkpointed stop."""
    ready = tmp_path / "ready"
    status, out, calls = signalled_job(tmp_path, f"touch {ready}; sleep 30; exit 0", ready)
    assert status == 0, out
    assert "died of SIGUSR2 before it could checkpoint" in out and "exit 75" in out
    assert calls == ["requeue", "4242"]


def test_a_signal_as_the_script_starts_is_not_the_shells_death(tmp_path):
    """Regression (a flaky test under load): the signal came before the batch shell had set its
    trap, and killed it. The trap now comes before anything else the script does; a signal
    during start-up or setup (here: a 1 s setup) requeues without running the command."""
    status, out, calls = signalled_job(tmp_path, "touch ran; exit 0", setup="sleep 1")
    assert status == 0, out
    assert "came before the command started" in out and calls == ["requeue", "4242"]
    assert not (tmp_path / "job" / "ran").exists()


def test_a_command_that_signals_itself_is_a_failure_not_a_requeue(tmp_path):
    """Only the forwarded signal means "requeue me": a command dying of SIGUSR2 by itself fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / "job").mkdir()
    script = build_script(command="kill -USR2 $BASHPID; sleep 5", job_name="t", job_dir=str(tmp_path / "job"),
                          options={"signal": "B:USR2@60", "requeue": True})
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(script))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 140, out.stdout + out.stderr
    assert not calls.exists()
