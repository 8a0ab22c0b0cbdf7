"""SlurmHook.usage against the real Slurm 22.05 and slurmdbd: what sacct says a job used.

The local site samples memory every 30 s (``JobAcctGatherFrequency=30``) and has no energy
plugin or GPUs. A step shorter than the interval gets no MaxRSS sample, so the jobs here run
their work as an ``srun`` step sampled every second (``--acctg-freq=task=1``), as a site with
short jobs would.
"""

from __future__ import annotations

import time
import uuid

import pytest

from slurmflow.hooks.slurm import SlurmHook
from slurmflow.identity import JobKey
from slurmflow.sbatch import build_script, render_script
from slurmflow.usage import JobUsage, summarize
from tests.integration import test_slurm_fixtures as live
from tests.integration.test_slurm_fixtures import wait_state

pytestmark = pytest.mark.integration
slurm_conn = live.slurm_conn  # the fixture, shared by the Slurm integration modules

MIB = 1 << 20
# ~2 s of CPU with 64 MiB resident (bytes of b"x", so the pages are really touched).
BURN = (
    "srun --acctg-freq=task=1 python3 -c '"
    "import time\n"
    "block = b\"x\" * (64 << 20)\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < {seconds}: pass\n"
    "'"
)


def submit(hook: SlurmHook, slurm_conn, task: str, seconds: float, **options) -> str:
    key = JobKey("it_usage", uuid.uuid4().hex, task)
    script = build_script(
        command=BURN.format(seconds=seconds),
        job_name=key.job_name(0),
        job_dir=key.job_dir(hook.job_root, 0),
        options={"account": slurm_conn["account"], "partition": slurm_conn["partition"], "time": "5", **options},
    )
    outcome = hook.submit(key, 0, script, render_script(script))
    assert outcome.action == "submitted"
    return outcome.job_id


def settled_usage(hook: SlurmHook, job_ids: list[str], expected: set[str], timeout: float = 60) -> dict[str, JobUsage]:
    """slurmdbd records the end (and the steps' figures) a moment after the controller: poll."""
    deadline = time.monotonic() + timeout
    usage = hook.usage(job_ids)
    while time.monotonic() < deadline:
        if set(usage) == expected and all(u.state == "COMPLETED" and u.max_rss_bytes for u in usage.values()):
            return usage
        time.sleep(1)
        usage = hook.usage(job_ids)
    raise AssertionError(f"accounting did not settle for {sorted(expected)}: {usage}")


def test_usage_of_finished_jobs(slurm_conn, stack_env):
    hook = SlurmHook()
    job_id = submit(hook, slurm_conn, "burn", 2)
    array_id = submit(hook, slurm_conn, "burn_array", 1, array="0-1")
    wait_state(stack_env, job_id, {"COMPLETED"}, timeout=120)
    # The array's tasks: settled_usage waits for accounting to call each one COMPLETED.
    settled_usage(hook, [job_id, array_id], {job_id, f"{array_id}_0", f"{array_id}_1"}, timeout=120)
    before = hook.command_counts["sacct"]
    usage = hook.usage([job_id, array_id])
    assert hook.command_counts["sacct"] == before + 1, "one sacct for every job and task"

    job = usage[job_id]
    assert job.elapsed_seconds > 0 and job.alloc_cpus >= 1 and job.nodes == 1 and job.runs == 1
    assert 1.5 < job.total_cpu_seconds < 10
    assert job.cpu_efficiency is not None and 0 < job.cpu_efficiency <= 1.5
    assert job.max_rss_bytes is not None and job.max_rss_bytes > 32 * MIB
    assert (job.alloc_gpus, job.gpu_hours) == (0, 0)
    assert job.energy_joules is None, "the local site has no acct_gather_energy plugin"
    tags = job.as_tags()
    assert float(tags["slurm.cpu_efficiency"]) == pytest.approx(job.cpu_efficiency, abs=1e-4)
    assert int(tags["slurm.max_rss_bytes"]) == job.max_rss_bytes and "slurm.energy_joules" not in tags

    tasks = [usage[f"{array_id}_0"], usage[f"{array_id}_1"]]
    assert [t.array_task for t in tasks] == [0, 1] and {t.base_id for t in tasks} == {array_id}
    summary = summarize(tasks)
    assert summary.job_id == array_id and summary.tasks == 2
    assert summary.total_cpu_seconds > 1.5 and summary.max_rss_bytes > 32 * MIB
    assert summary.gpu_hours == 0 and summary.energy_joules is None

    # One task alone, by its own id.
    assert set(hook.usage([f"{array_id}_1"])) == {f"{array_id}_1"}
