"""Slurm releases: the feature table, version parsing, per-release argv, and every parser on every
release's recorded output (fixtures/slurm/<release>/, see the README there)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from slurmflow import commands
from slurmflow.parsing import group_by_job, parse_config_value, parse_sacct, parse_scontrol_jobs, parse_squeue
from slurmflow.poller import ClusterPoller, Subscription
from slurmflow.states import SlurmState
from slurmflow.status import ResolveOptions, lookup_key, resolve_states, run_sync
from slurmflow.versions import (
    FEATURES,
    GATED_STATES,
    MINIMUM,
    SlurmVersion,
    UnsupportedSlurmVersion,
    features_for,
    parse_version,
    read_probe,
)
from tests.unit.fixtures.slurm.fakes import FakeAsyncHook, FakeCluster, fake_hook

RELEASES_DIR = Path(__file__).parent / "fixtures" / "slurm"
RELEASES = sorted(p.name for p in RELEASES_DIR.iterdir() if (p / "version.txt").exists())


def recorded(release: str, name: str) -> str:
    return (RELEASES_DIR / release / name).read_text()


def features_of(release: str):
    return features_for(recorded(release, "version.txt"))


# --- versions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("slurm 22.05.8\n", SlurmVersion(22, 5, 8)),
        ("slurm 23.11.4", SlurmVersion(23, 11, 4)),
        ("slurm-wlm 20.11.9\n", SlurmVersion(20, 11, 9)),
        ("slurm 25.05.0-0rc1", SlurmVersion(25, 5, 0, "0rc1")),
        ("slurm 24.05.4-1", SlurmVersion(24, 5, 4, "1")),
        ("Configuration data as of 2026-11-21T11:15:30\nAccountingStorageBackupHost = (null)\n"
         "SLURM_CONF              = /etc/slurm/slurm.conf\nSLURM_VERSION           = 23.11.4\n", SlurmVersion(23, 11, 4)),
        # scontrol -vV adds the API version line after the release
        ("slurm 24.11.1\nslurm_api_version: 2621440, 40.0.0\n", SlurmVersion(24, 11, 1)),
    ],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_versions_order_by_release_then_micro():
    assert parse_version("slurm 20.11.9") < parse_version("slurm 21.08.0") < parse_version("slurm 25.05.0-0rc1")
    assert str(parse_version("slurm 25.05.0-0rc1")) == "25.05.0-0rc1"


@pytest.mark.parametrize("text", ["", "bash: scontrol: command not found", "slurm", "version 22.05"])
def test_no_version_is_an_error(text):
    with pytest.raises(ValueError, match="no Slurm version"):
        parse_version(text)


def test_older_than_the_minimum_is_refused_naming_the_minimum():
    with pytest.raises(UnsupportedSlurmVersion, match=r"Slurm 20\.02\.7 is not supported: .* 20\.11 or newer"):
        features_for("slurm 20.02.7")
    assert features_for("slurm-wlm 20.11.0").version.release == MINIMUM.release


def test_read_probe_unreadable_means_unknown():
    assert read_probe(127, "") is None
    assert read_probe(0, "something else") is None
    assert read_probe(0, "slurm 23.11.4\n").has("squeue_exit_code_pair")
    with pytest.raises(UnsupportedSlurmVersion):
        read_probe(0, "slurm 19.05.8\n")


def test_the_table():
    # every row cites a source; required rows predate the floor; windows are well formed
    for name, feature in FEATURES.items():
        assert feature.source and feature.what, name
        assert feature.until is None or feature.since < feature.until, name
        if feature.required:
            assert feature.in_release(MINIMUM.release), f"{name} is required but newer than {MINIMUM}"
    assert set(GATED_STATES) <= {s.value for s in SlurmState}
    assert set(GATED_STATES.values()) <= set(FEATURES)
    with pytest.raises(KeyError, match="no Slurm feature 'squeue_exitcode'"):
        features_for("slurm 22.05.8").has("squeue_exitcode")


@pytest.mark.parametrize(
    ("release", "pair", "cron", "expediting", "sacct_over_128", "planned"),
    [
        ("20.11", False, True, False, False, False),
        ("22.05", False, False, False, False, False),
        ("23.11", True, False, False, False, True),
        ("24.05", True, False, False, False, True),
        ("24.11", True, False, False, False, True),
        ("25.05", True, False, False, False, True),
        ("25.11", True, False, True, True, True),
    ],
)
def test_features_per_release(release, pair, cron, expediting, sacct_over_128, planned):
    features = features_of(release)
    assert features.has("squeue_exit_code_pair") is pair
    assert features.has("state_requeued_cron") is cron
    assert features.has("state_expediting") is expediting
    assert features.has("sacct_exit_code_over_128") is sacct_over_128
    assert features.has("sacct_planned") is planned
    assert features.has("json_output") is (features.version.release >= (21, 8))
    assert {n for n, f in FEATURES.items() if f.required} <= features.names


# --- golden argv per release ----------------------------------------------------------------------

COMMON_LIVE = ("PENDING,CONFIGURING,RUNNING,COMPLETING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,RESIZING,"
               "SUSPENDED,STOPPED,SIGNALING,STAGE_OUT,SPECIAL_EXIT,RESV_DEL_HOLD")
GOLDEN_LIVE = {
    "20.11": COMMON_LIVE.replace("REQUEUE_FED,", "REQUEUE_FED,REQUEUED_CRON,"),
    "22.05": COMMON_LIVE, "23.11": COMMON_LIVE, "24.05": COMMON_LIVE, "24.11": COMMON_LIVE, "25.05": COMMON_LIVE,
    "25.11": COMMON_LIVE.replace("REQUEUE_FED,", "REQUEUE_FED,EXPEDITING,"),
}


@pytest.mark.parametrize("release", RELEASES)
def test_golden_live_states_per_release(release):
    features = features_of(release)
    assert ",".join(commands.live_states(features)) == GOLDEN_LIVE[release]
    script = commands.submit_once("/j", "/j/job.sh", "train.abc.g0", features)
    assert f"--states={GOLDEN_LIVE[release]} " in script


def test_unknown_release_asks_for_what_every_release_knows():
    assert ",".join(commands.live_states(None)) == COMMON_LIVE == ",".join(commands.LIVE_STATES)
    assert commands.submit_once("/j", "/j/job.sh", "n") == commands.submit_once("/j", "/j/job.sh", "n", None)


@pytest.mark.parametrize("release", RELEASES)
def test_the_other_commands_are_the_same_on_every_release(release):
    """squeue/sacct/scontrol/scancel/sbatch argv do not depend on the release (the table's
    required rows): a change here must come with a table row."""
    assert commands.squeue_jobs(["5", "4_1"]) == [
        "squeue", "--noheader", "--array", "--states=all", "--jobs=4_1,5",
        "--Format=JobID:40|,ArrayJobID:40|,ArrayTaskID:40|,Name:300|,State:40|,Reason:120|,exit_code:40|,"
        "RestartCnt:40|,NodeList:200|,TimeUsed:40|"]
    assert commands.sacct_jobs(["7"])[:5] == ["sacct", "--noheader", "--parsable2", "--allocations", "--duplicates"]
    assert commands.scontrol_show_job("7") == ["scontrol", "--oneliner", "show", "job", "7"]
    assert commands.sbatch_test_only("/j/s.sh") == ["sbatch", "--test-only", "/j/s.sh"]
    assert commands.slurm_version() == ["scontrol", "--version"]


# --- every parser on every release's output ---------------------------------------------------------


def _plain(records):
    return {r.name: r for r in records if r.array_task is None}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("told", [True, False], ids=["release-known", "release-unknown"])
def test_parse_squeue_every_release(release, told):
    features = features_of(release) if told else None
    records = parse_squeue(recorded(release, "squeue.txt"), features)
    plain = _plain(records)
    exits = {name: (r.state.exit_code, r.state.signal) for name, r in plain.items() if r.state.state.ends_run}
    assert exits == {"fx.completed": (0, 0), "fx.failed": (3, 0), "fx.cancelled": (0, 15), "fx.signal": (0, 9),
                     "fx.killed": (137, 0)}
    assert plain["fx.requeued"].state.restarts == 1 and plain["fx.requeued"].state.reason == "BeginTime"
    assert {r.job_id for r in group_by_job(records)["23"]} == {f"23_{i}" for i in range(6)}
    if release == "25.11":
        expedite = plain["fx.expedite"].state
        assert expedite.state is SlurmState.EXPEDITING and not expedite.is_terminal
        assert SlurmState.EXPEDITING.is_live_in_controller


@pytest.mark.parametrize("release", RELEASES)
def test_parse_squeue_refuses_the_other_releases_exit_code(release):
    """Told the release, a line in the other release's form is an error, not a guess."""
    from slurmflow.parsing import SlurmParseError

    other = "25.11" if not features_of(release).has("squeue_exit_code_pair") else "22.05"
    with pytest.raises(SlurmParseError, match="exit_code"):
        parse_squeue(recorded(other, "squeue.txt"), features_of(release))


@pytest.mark.parametrize("release", RELEASES)
def test_parse_sacct_every_release(release):
    plain = _plain(parse_sacct(recorded(release, "sacct.txt")))
    assert plain["fx.failed"].state.exit_code == 3
    assert plain["fx.cancelled"].state.reason == "by 1001"
    assert plain["fx.signal"].state.signal == 9
    assert plain["fx.requeued"].state.state is SlurmState.PENDING and plain["fx.requeued"].state.restarts == 1
    # the same exit 137: sacct printed it minus 128 until 25.11 (scontrol and squeue never did)
    over_128 = features_of(release).has("sacct_exit_code_over_128")
    assert plain["fx.killed"].state.exit_code == (137 if over_128 else 9)


@pytest.mark.parametrize("release", RELEASES)
def test_parse_scontrol_every_release(release):
    records = parse_scontrol_jobs(recorded(release, "scontrol.txt"))
    plain = _plain(records)
    assert plain["fx.completed"].state.state is SlurmState.COMPLETED
    assert plain["fx.failed"].state.exit_code == 3 and plain["fx.killed"].state.exit_code == 137
    assert plain["fx.completed"].node_list == "local1" and plain["fx.completed"].start
    assert plain["fx.requeued"].state.restarts == 1
    if release == "25.11":
        assert plain["fx.expedite"].state.state is SlurmState.EXPEDITING


@pytest.mark.parametrize("release", RELEASES)
def test_parse_config_version_line(release):
    version = features_of(release).version
    text = f"Configuration data as of 2026-11-21T11:15:30\nMaxArraySize            = 1001\nSLURM_VERSION           = {version}\n"
    assert parse_version(text) == version
    assert parse_config_value(text, "MaxArraySize") == "1001"


# --- detection: once per connection ----------------------------------------------------------------


def test_the_hook_probes_once_per_connection():
    cluster = FakeCluster()
    cluster.version = "slurm 23.11.4"
    hook = fake_hook(cluster)
    hook._version_known = False  # a fresh connection
    cluster.add_job("x", "RUNNING")
    hook.get_states(["100"])
    hook.get_states(["100"])
    assert hook.version_probes == 1 and hook.features.version == SlurmVersion(23, 11, 4)
    assert cluster.tools().count("scontrol") == 1 and hook.command_counts["scontrol"] == 0
    hook._drop_connection()
    hook.get_states(["100"])
    assert hook.version_probes == 2


def test_the_hook_refuses_an_old_slurm_before_any_query():
    cluster = FakeCluster()
    hook = fake_hook(cluster)
    cluster.version, hook._version_known = "slurm 20.02.7", False  # what a fresh connection finds
    with pytest.raises(UnsupportedSlurmVersion, match="20.11 or newer"):
        hook.get_states(["100"])
    assert cluster.tools() == ["scontrol"]


def test_the_hook_uses_safe_defaults_when_the_probe_prints_nothing():
    cluster = FakeCluster()
    hook = fake_hook(cluster)
    cluster.version, hook._version_known = "weird", False
    assert hook.features is None and hook.version_probes == 1
    assert hook.features is None and hook.version_probes == 1, "an unreadable answer is cached too"


def test_resolve_and_lookup_read_squeue_in_the_release_format():
    new = features_for("slurm 24.11.1")
    runner = {"squeue": recorded("24.11", "squeue.txt"), "sacct": recorded("24.11", "sacct.txt")}

    def run(argv):
        from slurmflow.status import CommandResult

        return CommandResult(0, runner[argv[0]], "")

    snaps = run_sync(resolve_states(["28"], ResolveOptions(features=new)), run)
    assert snaps["28"].state.exit_code in {9, 137}  # sacct's figure wins once the job ended
    found = run_sync(lookup_key(["fx.killed"], features=new), run)
    assert set(found) == {"28"}


class _OldSlurmHook(FakeAsyncHook):
    async def get_states(self, job_ids, options):
        options.features = features_for("slurm 20.02.7")  # what the real hook's probe raises


def test_the_poller_tells_every_waiting_task_at_once_on_an_old_slurm():
    async def go():
        cluster = FakeCluster()
        poller = ClusterPoller("c", lambda _: _OldSlurmHook(cluster), failure_limit=6, coalesce=0, linger=0)
        sub = poller.subscribe(Subscription("100"))
        update = await asyncio.wait_for(sub.next_update(), 5)
        poller.unsubscribe(sub)
        return update

    update = asyncio.run(go())
    assert update.error and "20.11 or newer" in update.error
