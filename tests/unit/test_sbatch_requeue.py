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


def test_preemption_signal_reaches_the_command_which_checkpoints_and_the_script_requeues(tmp_path):
    """``--signal=B:USR2``: Slurm signals only the batch shell; it forwards the signal to the
    command's process group, the command (like hpctrain) stops with 75, the shell requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    ready = tmp_path / "ready"
    command = (f"trap 'echo checkpoint saved; exit 75' USR2; touch {ready}; "
               "for i in $(seq 1 300); do sleep 0.1; done; exit 0")
    script = build_script(command=command, job_name="t", job_dir=str(job_dir),
                          options={"signal": "B:USR2@60", "requeue": True})
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(script))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)  # what Slurm does at preemption (preempt_send_user_signal)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "forwarding SIGUSR2" in out and "checkpoint saved" in out and "exit 75" in out
    assert calls.read_text().split() == ["requeue", "4242"]
