"""The chaos suite's smoke in ``make test``: one real trial, kill -9 of the train task between
its sbatch and its ``slurm_job`` XCom write (``make chaos`` runs every fault 10 times).

It is also the regression test of the first defect the suite found: the retry found the job
COMPLETED and reported it without showing one line of its log.
"""

from __future__ import annotations

import json

import pytest

from scripts.chaos.__main__ import main

pytestmark = pytest.mark.e2e


def test_a_task_killed_between_sbatch_and_its_xcom_write_reattaches_to_its_one_job(api, tmp_path):
    results = tmp_path / "chaos.json"
    rc = main(["--faults", "kill-task", "--phases", "submit", "--trials", "1", "--orphan-wait", "5",
               "--results", str(results), "--doc", str(tmp_path / "RELIABILITY.md")])
    trial = json.loads(results.read_text())["trials"][0]
    assert trial["phase_hit"] and trial["xcom_written_before_kill"] is False, trial.get("fault_detail")
    assert rc == 0, {k: trial.get(k) for k in ("outcome", "duplicates", "orphans", "lines", "registrations")}
    assert trial["tasks"]["train"]["tries"] == 2 and len(trial["slurm_jobs"]) == 1
    assert trial["lines"]["exact"], trial["lines"]
