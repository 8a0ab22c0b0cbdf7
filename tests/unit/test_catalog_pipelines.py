"""The catalog answers "which runs used this dataset" (experiment_pipeline's prepare key)."""

from __future__ import annotations

import pytest

from slurmflow.hooks.catalog import RunCatalogHook


class _Collection:
    """Just the calls the hook makes: upsert with $set/$setOnInsert, equality finds."""

    def __init__(self) -> None:
        self.docs: list[dict] = []

    def _match(self, query: dict) -> list[dict]:
        return [d for d in self.docs if all(d.get(k) == v for k, v in query.items())]

    def update_one(self, query: dict, update: dict, upsert: bool = False) -> None:
        found = self._match(query)
        if found:
            found[0].update(update["$set"])
        elif upsert:
            self.docs.append({**query, **update.get("$setOnInsert", {}), **update["$set"]})

    def find_one(self, query: dict, projection: dict | None = None) -> dict | None:
        found = self._match(query)
        return dict(found[0]) if found else None

    def find(self, query: dict, projection: dict | None = None) -> list[dict]:
        return [dict(d) for d in self._match(query)]


@pytest.fixture
def catalog():
    hook = RunCatalogHook()
    hook.__dict__["db"] = {"pipelines": _Collection()}
    return hook


def test_runs_using_dataset(catalog):
    catalog.record_pipeline("experiment_pipeline/r1/pipeline", {"dataset_key": "d1", "stages": {}})
    catalog.record_pipeline("experiment_pipeline/r2/pipeline", {"dataset_key": "d1", "stages": {}})
    catalog.record_pipeline("experiment_pipeline/r3/pipeline", {"dataset_key": "d2", "stages": {}})
    catalog.record_pipeline("experiment_pipeline/r1/pipeline", {"dataset_key": "d1", "state": "completed"})
    runs = catalog.runs_using_dataset("d1")
    assert [r["run_key"] for r in runs] == ["experiment_pipeline/r1/pipeline", "experiment_pipeline/r2/pipeline"]
    assert runs[0]["state"] == "completed" and catalog.runs_using_dataset("nope") == []
