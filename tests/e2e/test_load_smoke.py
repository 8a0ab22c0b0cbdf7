"""`make load`'s smoke in `make test`: two train_model runs triggered at once, all succeed with
one Slurm job each, and the sampler sees the controller and the triggerer (the harness is real:
a broken sdiag parse or RPC count fails here, not only in a long run)."""

from __future__ import annotations

import pytest

from scripts.chaos.load import held, main

pytestmark = pytest.mark.e2e


def test_two_runs_at_once_succeed_with_one_job_each(tmp_path):
    result = main(["--runs", "2", "--days", "0", "--every", "5", "--timeout", "900",
                   "--results", str(tmp_path / "load.json"), "--doc", str(tmp_path / "R.md")])
    s = result["summary"]
    assert held(result), s
    assert s["slurm_jobs"] == 2 and s["duplicate_jobs"] == 0
    assert result["intervals"], "the sampler took no two good samples"
    assert s["triggerer_rss_mb"]["max"] > 50 and s["job_info_rpcs_per_interval"]["max"] > 0
    assert "| runs that succeeded | 2 of 2 |" in (tmp_path / "R.md").read_text()
