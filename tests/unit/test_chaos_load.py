"""The load harness's pure parts: sdiag parsing, intervals, the summary and the rendered section."""

from __future__ import annotations

import datetime as dt

from scripts.chaos.load import BEGIN, END, backfill_days, intervals, render, summarise, update_doc
from scripts.chaos.observe import parse_sdiag

SDIAG = """\
*******************************************************
sdiag output at Wed Dec 02 14:20:29 2026 (1796221229)
*******************************************************
Remote Procedure Call statistics by message type
\tREQUEST_PARTITION_INFO                  ( 2009) count:2      ave_time:267    total_time:534
\tREQUEST_JOB_INFO                        ( 2003) count:41     ave_time:929    total_time:1859
\tREQUEST_JOB_INFO_SINGLE                 ( 2021) count:3      ave_time:929    total_time:1859
\tREQUEST_PING                            ( 1008) count:1      ave_time:293    total_time:293

Remote Procedure Call statistics by user
\troot            (       0) count:6      ave_time:503    total_time:3022
\tslurmflow       (    1001) count:57     ave_time:503    total_time:3022
"""


def test_sdiag_counts_job_info_rpcs_of_every_kind_and_the_users_rpcs():
    assert parse_sdiag(SDIAG, "slurmflow") == {"job_info_rpcs": 44, "user_rpcs": 57}
    assert parse_sdiag(SDIAG, "nobody") == {"job_info_rpcs": 44, "user_rpcs": 0}


def sample(t, rpcs, user, cpu, pid=7, deferred=1):
    return {"t": t, "triggerer_pid": pid, "triggerer_cpu_s": cpu, "triggerer_rss": 200 * 2**20,
            "deferred": deferred, "job_info_rpcs": rpcs, "user_rpcs": user}


def test_intervals_are_deltas_and_skip_restarts_and_gaps():
    samples = [sample(0, 10, 20, 1.0), sample(10, 13, 25, 2.0), {"t": 15, "error": "timeout"},
               sample(20, 15, 28, 2.5), sample(30, 2, 3, 0.1, pid=8), sample(40, 4, 6, 0.6, pid=8)]
    got = intervals(samples)
    assert [(i["job_info_rpcs"], i["user_rpcs"], i["triggerer_cpu_pct"]) for i in got] == [
        (3, 4, 10.0), (2, 2, 5.0), (2, 2, 5.0)]  # the restart (pid 7 -> 8) is dropped
    assert got[0]["triggerer_rss_mb"] == 200.0


def test_summary_counts_failures_and_duplicates_and_buckets_by_waiting_jobs():
    runs = [{"run_id": "a", "state": "success", "slurm_jobs": ["1"], "duplicate_job_ids": []},
            {"run_id": "b", "state": "failed", "slurm_jobs": ["2", "3"], "duplicate_job_ids": ["3"]}]
    ivals = [{"span_s": 10, "deferred": d, "job_info_rpcs": r, "user_rpcs": r, "triggerer_cpu_pct": 1.0,
              "triggerer_rss_mb": 100.0} for d, r in ((0, 0), (1, 2), (4, 3), (4, 5), (9, 3))]
    s = summarise(runs, ivals, every=10)
    assert (s["runs"], s["succeeded"], s["failed"], s["duplicate_jobs"], s["slurm_jobs"]) == (2, 1, ["b"], 1, 3)
    assert s["job_info_rpcs_per_interval_by_waiting"] == {
        "0": {"p50": 0, "max": 0}, "1-2": {"p50": 2, "max": 2}, "3-5": {"p50": 4, "max": 5},
        "6+": {"p50": 3, "max": 3}}
    section = render({"started_at": "now", "wall_s": 60, "summary": s,
                      "params": {"runs": 1, "days": 1, "every": 10.0}})
    assert section.startswith(BEGIN) and section.endswith(END) and "| runs that succeeded | 1 of 2 |" in section


def test_backfill_dates_lie_inside_the_seeded_campaign_days():
    assert backfill_days(5, dt.date(2026, 12, 10)) == ("2026-12-04", "2026-12-08")


def test_the_section_replaces_its_old_self_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text("# Reliability\n\nhand-written\n")
    update_doc(doc, f"{BEGIN}\nold\n{END}")
    update_doc(doc, f"{BEGIN}\nnew\n{END}")
    text = doc.read_text()
    assert "hand-written" in text and "new" in text and "old" not in text and text.count("## Load") == 1
