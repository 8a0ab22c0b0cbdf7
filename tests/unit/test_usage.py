"""Usage facts from sacct (slurmflow.usage) and SlurmHook.usage over a fake login node.

Two fixtures: ``sacct_usage_local.txt`` was recorded from the local Slurm 22.05 (no GPUs, no
energy plugin, ``JobAcctGatherFrequency=30``); ``sacct_usage_gpu_site.txt`` is written in the
same format for a GPU site that records energy (typed and untyped ``gres/gpu`` TRES, ``.extern``
steps, a two-node job, Slurm's NO_VAL for energy).
"""

from __future__ import annotations

import json

import pytest

from slurmflow.errors import SlurmCommandError
from slurmflow.parsing import SlurmParseError, parse_duration, parse_duration_exact
from slurmflow.usage import USAGE_FIELDS, JobUsage, parse_gpus, parse_memory, parse_usage, summarize
from tests.unit.fixtures.slurm.fakes import FakeCluster, fake_hook, fixture

KIB = 1024
GIB = 1024**3


@pytest.fixture(scope="module")
def local() -> dict[str, JobUsage]:
    return parse_usage(fixture("sacct_usage_local.txt"))


@pytest.fixture(scope="module")
def site() -> dict[str, JobUsage]:
    return parse_usage(fixture("sacct_usage_gpu_site.txt"))


# --- recorded on the local Slurm ------------------------------------------------------------------


def test_job_with_steps(local):
    job = local["1"]  # 2 CPUs, 5 s; the batch step burned 1 s, an srun step (2 tasks) 3 s
    assert (job.base_id, job.array_task, job.state, job.runs) == ("1", None, "COMPLETED", 1)
    assert (job.elapsed_seconds, job.alloc_cpus, job.nodes, job.core_seconds) == (5, 2, 1, 10)
    # The job line's TotalCPU already sums the steps: counted once, with its milliseconds.
    assert job.total_cpu_seconds == pytest.approx(4.196)
    assert job.cpu_efficiency == pytest.approx(0.4196)
    # MaxRSS comes from the one sampled step (.0); the batch step's is blank.
    assert job.max_rss_bytes == 90432 * KIB
    assert (job.alloc_gpus, job.gpu_hours) == (0, 0)
    assert job.energy_joules is None, "no acct_gather_energy plugin: sacct prints 0 or nothing"


def test_short_batch_job_has_cpu_time_but_no_memory_sample(local):
    # 2 s in the batch step, shorter than JobAcctGatherFrequency=30: TotalCPU (rusage) is there,
    # MaxRSS is not. Unknown is None, never 0.
    task = local["2_0"]
    assert task.total_cpu_seconds == pytest.approx(0.527) and task.max_rss_bytes is None
    assert "slurm.max_rss_bytes" not in task.as_tags()
    # A batch job that outlived one sampling interval has it.
    assert local["7"].max_rss_bytes == 71332 * KIB


def test_array_tasks_are_keyed_by_task(local):
    tasks = {k: v for k, v in local.items() if v.base_id == "2"}
    assert sorted(tasks) == ["2_0", "2_1", "2_2"]
    assert [tasks[k].array_task for k in sorted(tasks)] == [0, 1, 2]
    summary = summarize(tasks.values())
    assert (summary.job_id, summary.tasks, summary.core_seconds) == ("2", 3, 6)
    assert summary.total_cpu_seconds == pytest.approx(0.527 + 0.524 + 0.524)
    assert summary.cpu_efficiency == pytest.approx(1.575 / 6)
    assert summary.max_rss_bytes is None and summary.energy_joules is None


def test_zero_elapsed(local):
    never_ran = local["3"]  # cancelled while held: no allocation, no steps
    assert (never_ran.state, never_ran.elapsed_seconds, never_ran.core_seconds) == ("CANCELLED", 0, 0)
    assert never_ran.cpu_efficiency is None and never_ran.gpu_hours == 0
    assert set(never_ran.as_tags()) == {
        "slurm.alloc_cpus", "slurm.alloc_gpus", "slurm.nodes", "slurm.total_cpu_seconds", "slurm.gpu_hours",
    }
    failed_at_once = local["4"]
    assert failed_at_once.state == "FAILED" and failed_at_once.cpu_efficiency is None


def test_requeued_job_counts_every_run(local):
    job = local["8"]  # ran 2 s, was requeued, ran again 5 s
    assert (job.runs, job.state) == (2, "COMPLETED")
    assert (job.elapsed_seconds, job.core_seconds) == (7, 7)
    assert job.total_cpu_seconds == pytest.approx(0.002 + 1.587)


def test_short_job_efficiency_may_pass_one(local):
    # ElapsedRaw is whole seconds, TotalCPU has milliseconds: a 2.05 s busy loop reads 2 s.
    assert local["10"].cpu_efficiency == pytest.approx(2.047 / 2)


# --- a GPU site with energy accounting ------------------------------------------------------------


def test_gpu_job_counts_typed_and_untyped_gres_once(site):
    job = site["4211"]
    assert (job.alloc_gpus, job.alloc_cpus, job.elapsed_seconds) == (4, 32, 7260)
    assert job.gpu_hours == pytest.approx(4 * 7260 / 3600)
    assert job.total_cpu_seconds == pytest.approx(96672)  # the job line: "1-02:51:12"
    assert job.cpu_efficiency == pytest.approx(96672 / 232320)
    assert job.max_rss_bytes == 43057152 * KIB  # the training step, not batch or extern
    assert job.energy_joules == 6154210


def test_typed_gpus_only_and_energy_from_steps(site):
    first, second = site["4300_0"], site["4300_1"]
    assert (first.alloc_gpus, second.alloc_gpus) == (1, 1)
    assert first.gpu_hours == pytest.approx(0.5)
    assert first.energy_joules == 1262004
    # The job line says 0; the steps overlap in time, so the largest one stands for the job.
    assert second.energy_joules == 412350
    assert second.max_rss_bytes == 10 * GIB
    assert "4300_2" not in site, "tasks that never started used nothing"


def test_multi_node_job_and_no_value_energy(site):
    job = site["4400"]
    assert (job.state, job.nodes, job.alloc_gpus) == ("TIMEOUT", 2, 8)
    assert job.gpu_hours == pytest.approx(8.0)
    # Steps add up to a little more than the job line, which drops the milliseconds past a day.
    assert job.total_cpu_seconds == pytest.approx(10.5 + 0.01 + 284989.5)
    assert job.energy_joules is None, "18446744073709551614 is Slurm's NO_VAL, not joules"


def test_array_summary_for_a_sweep(site):
    summary = summarize(u for u in site.values() if u.base_id == "4300")
    assert (summary.job_id, summary.tasks) == ("4300", 2)
    assert summary.gpu_hours == pytest.approx((1800 + 600) / 3600)
    # Past an hour sacct's job line drops the milliseconds; the steps' sum keeps them.
    cpu = (11560 + 0.002) + (3300.25 + 0.001)
    assert summary.total_cpu_seconds == pytest.approx(cpu)
    assert summary.cpu_efficiency == pytest.approx(cpu / (14400 + 4800))
    assert summary.max_rss_bytes == 10 * GIB
    assert summary.energy_joules == 1262004 + 412350
    assert summary.as_tags() == {
        "slurm.tasks": "2",
        "slurm.total_cpu_seconds": "14860.253",
        "slurm.cpu_efficiency": "0.774",
        "slurm.max_rss_bytes": str(10 * GIB),
        "slurm.gpu_hours": "0.6667",
        "slurm.energy_joules": "1674354",
    }
    assert summarize(site.values()).job_id == "4211,4300,4400"


def test_tags_and_catalog_record(site):
    job = site["4211"]
    assert job.as_tags() == {
        "slurm.alloc_cpus": "32",
        "slurm.alloc_gpus": "4",
        "slurm.nodes": "1",
        "slurm.total_cpu_seconds": "96672.0",
        "slurm.cpu_efficiency": "0.4161",
        "slurm.max_rss_bytes": str(43057152 * KIB),
        "slurm.gpu_hours": "8.0667",
        "slurm.energy_joules": "6154210",
    }
    record = job.as_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["job_id"] == "4211" and record["energy_joules"] == 6154210 and record["runs"] == 1
    assert site["4400"].as_dict()["energy_joules"] is None


# --- the pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("", None), ("0", 0), ("512", 512), ("90432K", 90432 * KIB), ("1.50G", int(1.5 * GIB)), ("300M", 300 << 20),
     ("2T", 2 << 40)],
)
def test_memory_units(text, size):
    assert parse_memory(text) == size


def test_bad_memory():
    with pytest.raises(SlurmParseError, match="12Q"):
        parse_memory("12Q")


@pytest.mark.parametrize(
    ("tres", "gpus"),
    [("billing=4,cpu=4,gres/gpu=4,mem=16G,node=1", 4), ("cpu=8,gres/gpu:a100=4,mem=1G", 4),
     ("gres/gpu:a100=2,gres/gpu:v100=1", 3), ("gres/gpu:a100=4,gres/gpu=4", 4), ("cpu=1,mem=256M,node=1", 0),
     ("", 0), ("gres/gpumem=40G,gres/gpu=1", 1)],
)
def test_gpus_from_tres(tres, gpus):
    assert parse_gpus(tres) == gpus


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:02.047", 2.047), ("02:03.456", 123.456), ("01:02:03", 3723), ("1-02:03:04", 93784),
     ("1-02:03:04.567", 93784.567), ("", None)],
)
def test_exact_durations(text, seconds):
    assert parse_duration_exact(text) == pytest.approx(seconds)
    assert parse_duration(text) == (None if seconds is None else int(seconds))


@pytest.mark.parametrize(
    ("text", "problem"),
    [("1|COMPLETED|5", "wanted 10 fields"),
     ("1.batch|COMPLETED|5|00:01.050|10|2|cpu=2||0|1", "step before its job line"),
     ("1|COMPLETED|five|00:01.050|10|2|cpu=2||0|1", "unreadable sacct line '1\\|COMPLETED\\|five"),
     ("1|COMPLETED|5|1:xx|10|2|cpu=2||0|1", "malformed duration"),
     ("1;x|COMPLETED|5|00:01.050|10|2|cpu=2||0|1", "not a job id"),
     ("1|COMPLETED|5|00:01.050|10|2|cpu=2||0|1\n1.0|COMPLETED|5|00:01.050|10|2|cpu=2|lots|0|1",
      "unreadable sacct line '1.0.*malformed memory size: 'lots'")],
)
def test_malformed_lines_name_the_problem(text, problem):
    with pytest.raises(SlurmParseError, match=problem):
        parse_usage(text)


# --- SlurmHook.usage ------------------------------------------------------------------------------


class UsageCluster(FakeCluster):
    """Answers sacct with the recorded usage lines (the fake's own sacct has job states only)."""

    def __init__(self, text: str, code: int = 0, err: str = "") -> None:
        super().__init__()
        self.answer = (code, text, err)

    def _sacct(self, argv):
        return self.answer


def test_hook_asks_sacct_once_for_all_jobs():
    cluster = UsageCluster(fixture("sacct_usage_local.txt"))
    usage = fake_hook(cluster).usage(["10", "2", "1", "2_1"])
    assert cluster.tools() == ["sacct"]
    argv = cluster.calls[0]
    assert "--jobs=1,2,2_1,10" in argv and "--duplicates" in argv and "--parsable2" in argv
    assert f"--format={','.join(USAGE_FIELDS)}" in argv
    assert "--allocations" not in argv, "MaxRSS and energy live on the step lines"
    assert usage["1"].max_rss_bytes == 90432 * KIB and usage["2_1"].array_task == 1


def test_hook_rejects_bad_ids_before_running_anything():
    cluster = UsageCluster("")
    hook = fake_hook(cluster)
    with pytest.raises(SlurmParseError):
        hook.usage(["1;reboot"])
    assert hook.usage([]) == {}
    assert cluster.calls == []


def test_hook_raises_when_accounting_is_off():
    cluster = UsageCluster("", code=1, err="sacct: error: Slurm accounting storage is disabled")
    with pytest.raises(SlurmCommandError, match="accounting storage is disabled"):
        fake_hook(cluster).usage(["1"])


# --- usage_of: registration waits for accounting to catch up ---------------------------------------


class LaggingCluster(FakeCluster):
    """slurmdbd a moment behind slurmctld: each sacct answers with the next recorded text."""

    def __init__(self, *answers: str) -> None:
        super().__init__()
        self.answers = list(answers)

    def _sacct(self, argv):
        return 0, self.answers.pop(0) if len(self.answers) > 1 else self.answers[0], ""


RUNNING_7 = "7|RUNNING|3|00:00:00|6|2|cpu=2,mem=512M,node=1|||1\n"
ENDED_7 = "7|COMPLETED|5|00:04.196|10|2|cpu=2,mem=512M,node=1||0|1\n7.batch|COMPLETED|5|00:04.1|10|2|cpu=2|90432K|0|1\n"


def test_usage_of_asks_again_until_accounting_has_the_end():
    from slurmflow.pipeline.results import usage_of

    cluster, slept = LaggingCluster("", RUNNING_7, ENDED_7), []
    usage = usage_of(fake_hook(cluster), ["7"], sleep=slept.append)
    assert usage["7"].state == "COMPLETED" and usage["7"].max_rss_bytes == 90432 * KIB
    assert cluster.tools() == ["sacct"] * 3 and slept == [0.5, 1.0]


def test_usage_of_gives_up_after_settle_with_what_accounting_has():
    from slurmflow.pipeline.results import usage_of

    cluster = LaggingCluster(RUNNING_7)
    usage = usage_of(fake_hook(cluster), ["7"], settle=0.0, sleep=pytest.fail)
    assert usage["7"].state == "RUNNING" and cluster.tools() == ["sacct"]


def test_usage_of_waits_only_for_the_tasks_that_ran():
    from slurmflow.pipeline.results import usage_of

    ended = "9_0|COMPLETED|1|00:00.5|1|1|cpu=1|||1\n9_1|FAILED|1|00:00.5|1|1|cpu=1|||1\n"
    cluster = LaggingCluster(ended)  # 9_2 was cancelled before it started: no record of its own
    usage = usage_of(fake_hook(cluster), ["9"], expect=["9_0", "9_1"], sleep=pytest.fail)
    assert sorted(usage) == ["9_0", "9_1"] and cluster.tools() == ["sacct"]
