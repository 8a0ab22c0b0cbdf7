"""SlurmHook submission flows with a fake login node: exactly once, even across unclear failures."""

from __future__ import annotations

import threading

import pytest

from slurmflow.errors import SlurmConnectionError, SlurmSubmitError
from slurmflow.identity import JobKey
from slurmflow.sbatch import build_script, render_script
from slurmflow.secrets import JobSecrets
from tests.unit.fixtures.slurm.fakes import FakeCluster, fake_hook

KEY = JobKey("dag", "run1", "train")


def prepared(gen=0, secrets=None):
    script = build_script(
        command="echo hi",
        job_name=KEY.job_name(gen),
        job_dir=KEY.job_dir("/home/u/jobs", gen),
        options={"account": "research"},
        secret_names=JobSecrets(secrets or {}).names,
    )
    return script, render_script(script), JobSecrets(secrets or {}).file_text()


def submit(hook, gen=0, secrets=None):
    script, text, secret_text = prepared(gen, secrets)
    return hook.submit(KEY, gen, script, text, secret_text, retry_wait=0)


def test_fresh_submission_stages_then_submits_once():
    cluster = FakeCluster()
    outcome = submit(fake_hook(cluster), secrets={"TOKEN": "s3cr3t"})
    assert outcome.action == "submitted" and outcome.job_id in cluster.jobs
    assert cluster.tools() == ["squeue", "sacct", "mkdir", "sftp-put", "sftp-put", "submit"]
    secret_put, script_put = cluster.calls[3], cluster.calls[4]
    assert secret_put[1].endswith(".slurmflow-secrets.env") and secret_put[2] == "0o600"
    assert script_put[1].endswith("job.sbatch")
    assert "s3cr3t" not in cluster.files[script_put[1]]
    assert "s3cr3t" in cluster.files[secret_put[1]]
    # No secret ever on a command line.
    assert not any("s3cr3t" in " ".join(c) for c in cluster.calls if c[0] != "sftp-put")
    # Lookups ask for this key's exact name, with a bounded sacct window.
    assert f"--name={KEY.job_name(0)}" in cluster.calls[0]
    assert any(a.startswith("--starttime=") for a in cluster.calls[1])


def test_live_job_is_reattached_not_resubmitted():
    cluster = FakeCluster()
    live = cluster.add_job(KEY.job_name(0), "RUNNING")
    outcome = submit(fake_hook(cluster))
    assert (outcome.action, outcome.job_id) == ("attached", live.job_id)
    assert "submit" not in cluster.tools() and len(cluster.jobs) == 1


def test_completed_job_is_reused():
    cluster = FakeCluster()
    done = cluster.add_job(KEY.job_name(0), "COMPLETED", in_squeue=False)
    outcome = submit(fake_hook(cluster))
    assert (outcome.action, outcome.job_id) == ("reused", done.job_id)
    assert len(cluster.jobs) == 1


def test_failed_job_is_replaced():
    cluster = FakeCluster()
    cluster.add_job(KEY.job_name(0), "FAILED", exit_code="1:0")
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "submitted" and len(cluster.jobs) == 2


def test_clear_cancels_previous_generation_and_submits_fresh():
    cluster = FakeCluster()
    old = cluster.add_job(KEY.job_name(0), "RUNNING")
    outcome = submit(fake_hook(cluster), gen=1)
    assert outcome.action == "submitted" and outcome.cancelled == (old.job_id,)
    assert old.state == "CANCELLED"
    assert cluster.jobs[outcome.job_id].name == KEY.job_name(1)


def test_dropped_connection_after_sbatch_attaches_to_the_job_it_created():
    cluster = FakeCluster()
    cluster.explode_after["submit"] = SlurmConnectionError("connection reset by peer")
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "attached"
    assert len(cluster.jobs) == 1, "zero duplicate jobs"
    # lookup, submit (lost answer), lookup again -> found
    assert cluster.tools() == ["squeue", "sacct", "mkdir", "sftp-put", "submit", "squeue", "sacct"]


def test_failure_before_sbatch_retries_after_lookup():
    cluster = FakeCluster()
    cluster.explode["submit"] = SlurmConnectionError("timed out")
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "submitted" and len(cluster.jobs) == 1
    assert cluster.count("submit") == 2


def test_previous_failed_job_is_not_mistaken_for_ours_after_an_unclear_failure():
    cluster = FakeCluster()
    cluster.add_job(KEY.job_name(0), "FAILED", in_squeue=False)
    cluster.explode["submit"] = SlurmConnectionError("timed out")
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "submitted" and len(cluster.jobs) == 2


def test_rejected_sbatch_names_the_cause_without_retrying():
    cluster = FakeCluster()
    cluster.sbatch_error = (1, "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified")
    with pytest.raises(SlurmSubmitError, match="Invalid account"):
        submit(fake_hook(cluster))
    assert cluster.count("submit") == 1


def test_controller_busy_is_retried():
    cluster = FakeCluster()
    cluster.sbatch_error = (1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")

    calls = {"n": 0}
    original = cluster._submit

    def flaky(argv):
        calls["n"] += 1
        if calls["n"] == 2:
            cluster.sbatch_error = None
        return original(argv)

    cluster._submit = flaky
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "submitted" and len(cluster.jobs) == 1


def test_unreachable_host_gives_up_with_the_cause():
    cluster = FakeCluster()
    hook = fake_hook(cluster, submit_attempts=2)
    hook.exec_bytes = lambda command, timeout=None: (_ for _ in ()).throw(  # type: ignore[method-assign]
        SlurmConnectionError("cannot connect to the Slurm login node u@login:22: Connection refused")
    )
    with pytest.raises(SlurmConnectionError, match="Connection refused"):
        submit(hook)


def test_race_inside_the_lock_attaches():
    """Another submitter created the job between our lookup and our sbatch."""
    cluster = FakeCluster()
    original = cluster._submit

    def racing(argv):
        cluster.add_job(KEY.job_name(0), "PENDING")
        return original(argv)

    cluster._submit = racing
    outcome = submit(fake_hook(cluster))
    assert outcome.action == "attached" and len(cluster.jobs) == 1


def test_cancel_and_preflight():
    cluster = FakeCluster()
    hook = fake_hook(cluster)
    job = cluster.add_job("x", "COMPLETED")
    hook.cancel([job.job_id])  # already finished: fine
    assert "to start at" in hook.test_only("/home/u/jobs/x/job.sbatch")
    cluster.sbatch_error = (1, "sbatch: error: invalid partition specified: nope")
    with pytest.raises(SlurmSubmitError, match="invalid partition"):
        hook.test_only("/home/u/jobs/x/job.sbatch")


def test_command_counts_by_tool():
    cluster = FakeCluster()
    hook = fake_hook(cluster)
    job = cluster.add_job("x", "RUNNING")
    hook.get_states([job.job_id])
    hook.get_states([job.job_id])
    assert hook.command_counts["squeue"] == 2 and hook.command_counts["sacct"] == 0


def test_remove_tree_only_inside_the_job_root():
    cluster = FakeCluster()
    hook = fake_hook(cluster)
    hook.remove_tree("/home/u/jobs/dag/run/task/g0")
    assert cluster.calls[-1] == ["rm", "-rf", "--", "/home/u/jobs/dag/run/task/g0"]
    for bad in ["/home/u/jobs", "/home/u/jobs/", "/home/u", "/home/u/jobs/../x", "/"]:
        with pytest.raises(ValueError, match="refusing"):
            hook.remove_tree(bad)


def test_pack_matching_quotes_every_value_and_runs_in_a_real_shell(tmp_path):
    """The one-round-trip download's command, run by a real sh against a real tree: only what
    matches comes, a hostile root is a path, not code; patterns cannot leave the root."""
    import io
    import subprocess
    import tarfile

    from slurmflow.commands import pack_matching

    root = tmp_path / "job dir; touch pwned"
    (root / "trial-0" / "mlruns-offline" / "r").mkdir(parents=True)
    (root / "trial-0" / "result.json").write_text("{}")
    (root / "trial-0" / "mlruns-offline" / "r" / "m").write_text("m")
    (root / "trial-0" / "model.ckpt").write_text("big")
    (root / "job.sbatch").write_text("#!/bin/bash")
    command = pack_matching(str(root), ["trial-*/result.json", "trial-*/mlruns-offline", "job.sbatch"])
    out = subprocess.run(["sh", "-c", command], capture_output=True, check=True, cwd=tmp_path).stdout
    with tarfile.open(fileobj=io.BytesIO(out), mode="r:gz") as archive:
        names = sorted(m.name for m in archive.getmembers() if m.isfile())
    assert names == ["./job.sbatch", "./trial-0/mlruns-offline/r/m", "./trial-0/result.json"]
    assert not (tmp_path / "pwned").exists()
    for bad in (["/etc/passwd"], ["../x"], []):
        with pytest.raises(ValueError):
            pack_matching(str(root), bad)


# --- reaching the login node -----------------------------------------------------------------------


class FlakySSH:
    """SSHHook's surface for _client: get_conn fails with the given errors, then connects."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.client = None
        self.username, self.remote_host, self.port = "u", "login", 22

    def get_conn(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.client = object()
        return self.client


def test_an_unreachable_login_node_is_waited_for_inside_the_try(monkeypatch):
    from slurmflow.hooks import slurm as slurm_mod
    from slurmflow.hooks.slurm import SlurmHook

    slept: list[float] = []
    me = threading.get_ident()
    # time is one module for every thread: a thread an earlier test left sleeping in a loop would
    # add its own calls (seen in a full CI run), so only this thread's sleeps count
    monkeypatch.setattr(slurm_mod.time, "sleep", lambda s: slept.append(s) if threading.get_ident() == me else None)
    hook = SlurmHook("slurm_default")
    hook.__dict__["ssh_hook"] = FlakySSH(ConnectionRefusedError(111, "Connection refused"), TimeoutError("timed out"))
    assert hook._client() is hook.ssh_hook.client
    assert hook.ssh_hook.calls == 3 and slept == [2.0, 4.0]


def test_a_refused_login_fails_at_once_and_patience_ends(monkeypatch):
    import paramiko

    from slurmflow.errors import SlurmConnectionError
    from slurmflow.hooks import slurm as slurm_mod
    from slurmflow.hooks.slurm import SlurmHook

    monkeypatch.setattr(slurm_mod.time, "sleep", lambda s: None)
    hook = SlurmHook("slurm_default")
    hook.__dict__["ssh_hook"] = FlakySSH(paramiko.AuthenticationException("Authentication failed."))
    with pytest.raises(SlurmConnectionError, match="Authentication failed"):
        hook._client()
    assert hook.ssh_hook.calls == 1, "a wrong key is not retried"

    hook = SlurmHook("slurm_default", connect_patience=0)
    hook.__dict__["ssh_hook"] = FlakySSH(ConnectionRefusedError(111, "Connection refused"), ConnectionRefusedError())
    with pytest.raises(SlurmConnectionError, match="cannot connect to the Slurm login node u@login:22"):
        hook._client()
    assert hook.ssh_hook.calls == 1
