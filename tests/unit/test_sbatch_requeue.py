"""The rendered sbatch script asks Slurm for a requeue when the command exits 75 (checkpointed).

Runs the real script with bash, a fake ``scontrol`` first on PATH recording its argv.
"""

from __future__ import annotations

import os
import subprocess

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
