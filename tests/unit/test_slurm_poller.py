"""The shared per-cluster poller: one status query per interval however many jobs wait."""

from __future__ import annotations

import asyncio

import pytest

from slurmflow import poller as poller_mod
from slurmflow.paths import JobPaths
from slurmflow.poller import ClusterPoller, Subscription, active_pollers, get_poller
from slurmflow.states import SlurmState
from slurmflow.wait import LogFollower
from tests.unit.fixtures.slurm.fakes import FakeAsyncHook, FakeCluster


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(poller_mod, "COALESCE_SECONDS", 0.0)
    monkeypatch.setattr(poller_mod, "LINGER_SECONDS", 0.05)


def make_poller(cluster, **kw):
    hook = FakeAsyncHook(cluster)
    return ClusterPoller("slurm_default", lambda conn_id: hook, jitter=0.0, **kw), hook


def sub(job_id, **kw):
    kw.setdefault("min_interval", 0.01)
    kw.setdefault("max_interval", 0.04)
    return Subscription(job_id=job_id, **kw)


async def rounds(subs, n):
    for _ in range(n):
        for s in subs:
            await asyncio.wait_for(s.next_update(), 5)


@pytest.mark.parametrize("waiting", [1, 20, 100])
def test_one_squeue_per_round_for_any_number_of_jobs(waiting):
    cluster = FakeCluster()
    jobs = [cluster.add_job(f"j{i}", "PENDING") for i in range(waiting)]

    async def go():
        poller, hook = make_poller(cluster)
        subs = [poller.subscribe(sub(j.job_id)) for j in jobs]
        await rounds(subs, 3)
        for s in subs:
            poller.unsubscribe(s)
        return poller

    poller = asyncio.run(go())
    assert len(poller.round_queries) >= 3
    assert all(dict(q) == {"squeue": 1} for q in poller.round_queries[:3])


def test_finish_costs_one_sacct_and_delivers_final_facts():
    cluster = FakeCluster()
    a, b = cluster.add_job("a", "RUNNING"), cluster.add_job("b", "RUNNING")

    async def go():
        poller, hook = make_poller(cluster)
        sa, sb = poller.subscribe(sub(a.job_id)), poller.subscribe(sub(b.job_id))
        await rounds([sa, sb], 1)
        a.state = b.state = "COMPLETED"
        ua, ub = await sa.next_update(), await sb.next_update()
        poller.unsubscribe(sa)
        poller.unsubscribe(sb)
        return poller, ua, ub

    poller, ua, ub = asyncio.run(go())
    assert ua.snapshot.final and ub.snapshot.state.state is SlurmState.COMPLETED
    assert dict(poller.round_queries[1]) == {"squeue": 1, "sacct": 1}


def test_backoff_grows_while_quiet_and_resets_on_change():
    cluster = FakeCluster()
    job = cluster.add_job("a", "PENDING")

    async def go():
        poller, _ = make_poller(cluster)
        s = poller.subscribe(sub(job.job_id, min_interval=0.01, max_interval=0.03))
        await rounds([s], 6)
        quiet = poller.interval
        job.state = "RUNNING"
        await rounds([s], 1)
        changed = poller.interval
        poller.unsubscribe(s)
        return quiet, changed

    quiet, changed = asyncio.run(go())
    assert quiet == pytest.approx(0.03)
    assert changed == pytest.approx(0.01)


def test_failures_become_an_error_naming_the_cause():
    cluster = FakeCluster()
    job = cluster.add_job("a", "RUNNING")

    async def go():
        poller, hook = make_poller(cluster)
        hook.fail_with = OSError("Connection refused")
        s = poller.subscribe(sub(job.job_id, failure_limit=3, failure_patience=0, min_interval=0.001,
                                 max_interval=0.002))
        updates = [await asyncio.wait_for(s.next_update(), 5) for _ in range(3)]
        poller.unsubscribe(s)
        return updates

    updates = asyncio.run(go())
    assert [u.warning is not None for u in updates] == [True, True, False]
    assert "Connection refused" in updates[-1].error


def test_failed_rounds_end_a_wait_only_once_they_span_the_patience(monkeypatch):
    """Regression (chaos, stop-sshd while deferred): the count alone ran out after ~150 s of
    backed-off polls, so a 150 s sshd outage failed the task while its job ran on. Many failed
    rounds within ``failure_patience`` are warnings; the first one past it is the error."""
    cluster = FakeCluster()
    job = cluster.add_job("a", "RUNNING")
    clock = [1000.0]
    monkeypatch.setattr(poller_mod.time, "monotonic", lambda: clock[0])

    async def go():
        poller, hook = make_poller(cluster)
        hook.fail_with = OSError("Connection refused")
        s = poller.subscribe(sub(job.job_id, failure_limit=3, failure_patience=300, min_interval=0.001,
                                 max_interval=0.002))
        updates = []
        for _ in range(8):  # 8 failed rounds, 30 s apart: 210 s, within the patience
            updates.append(await asyncio.wait_for(s.next_update(), 5))
            clock[0] += 30
        clock[0] += 100  # the outage goes on: 310 s since the first failure
        updates.append(await asyncio.wait_for(s.next_update(), 5))
        poller.unsubscribe(s)
        return updates

    updates = asyncio.run(go())
    assert all(u.warning and u.error is None for u in updates[:8]), updates
    assert updates[8].error and "Connection refused" in updates[8].error


def test_log_lines_of_running_jobs_in_one_batched_read(tmp_path):
    cluster = FakeCluster()
    jobs = [cluster.add_job(f"j{i}", "RUNNING") for i in range(3)]
    for j in jobs:
        (tmp_path / f"slurm-{j.job_id}.out").write_text(f"hello from {j.job_id}\n")

    async def go():
        poller, hook = make_poller(cluster)
        subs = [poller.subscribe(sub(j.job_id, logs=LogFollower(JobPaths.for_log(str(tmp_path / "slurm-%j.out"))))) for j in jobs]
        first = [await s.next_update() for s in subs]
        for s in subs:
            poller.unsubscribe(s)
        return poller, first

    poller, first = asyncio.run(go())
    assert dict(poller.round_queries[0]) == {"squeue": 1, "sh": 1}
    for j, update in zip(jobs, first, strict=True):
        assert update.chunks[0][1].data == f"hello from {j.job_id}\n".encode()


def test_registry_shares_one_poller_per_connection_and_forgets_idle_ones():
    cluster = FakeCluster()
    job = cluster.add_job("a", "RUNNING")
    hook = FakeAsyncHook(cluster)

    async def go():
        p1 = get_poller("slurm_default", lambda c: hook)
        p2 = get_poller("slurm_default", lambda c: hook)
        other = get_poller("other_cluster", lambda c: FakeAsyncHook(cluster))
        s = p1.subscribe(sub(job.job_id))
        await s.next_update()
        p1.unsubscribe(s)
        await asyncio.sleep(0.3)
        return p1, p2, other, active_pollers()

    p1, p2, other, left = asyncio.run(go())
    assert p1 is p2 and p1 is not other
    assert "slurm_default" not in left and hook.closed == 1


def test_cancellation_arriving_with_a_wake_up_is_not_swallowed():
    """Triggerer shutdown right as the last trigger leaves: the poller must stop, not linger."""
    cluster = FakeCluster()
    job = cluster.add_job("a", "RUNNING")

    async def go():
        poller, _ = make_poller(cluster, linger=30)
        s = poller.subscribe(sub(job.job_id))
        await s.next_update()
        poller.unsubscribe(s)  # wakes the sleeping loop ...
        poller._task.cancel()  # ... in the same loop iteration as the shutdown
        await asyncio.wait_for(asyncio.gather(poller._task, return_exceptions=True), 2)
        return poller._task.cancelled()

    assert asyncio.run(go()) is True
