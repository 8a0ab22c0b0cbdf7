"""Training data from a MongoDB query, against the stack's MongoDB-wire server (nx-27017)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hpctrain_testing import SURROGATE_TINY

from hpctrain.data.mongo import MongoQuery
from hpctrain.manifest import is_complete, load_manifest

pytestmark = pytest.mark.integration

FEATURES = ["rw", "r", "Tu", "Hu", "Tl", "Hl", "L", "Kw"]


@pytest.fixture
def campaign(stack_env):
    """A fresh database holding 300 simulation results, two thirds of them valid."""
    from pymongo import MongoClient

    from hpctrain.data.borehole import make_table

    db_name = f"hpctrain_test_{uuid.uuid4().hex[:8]}"
    client = MongoClient(stack_env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    rows = make_table(300, seed=3).to_dict("records")
    docs = [
        {
            "run": i,
            "valid": i % 3 != 0,
            "inputs": {k: row[k] for k in FEATURES},
            "flow": row["flow"],
            "notes": "x" * 50,
        }
        for i, row in enumerate(rows)
    ]
    client[db_name]["results"].insert_many(docs)
    client[db_name]["empty"].insert_one({"valid": False})
    yield db_name
    client.drop_database(db_name)
    client.close()


def _mongo_args(db: str, collection: str = "results") -> list[str]:
    return [
        "--data.path=null",
        f"--data.mongo.database={db}",
        f"--data.mongo.collection={collection}",
        "--data.mongo.query={valid: true}",
        f"--data.features=[{', '.join('inputs.' + f for f in FEATURES)}]",
        "--data.targets=[flow]",
    ]


def test_fit_from_mongo_query_records_identity(hpctrain, campaign, stack_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MONGO_URI", stack_env["MONGO_URI"])
    job = tmp_path / "job"
    before = dt.datetime.now(dt.UTC)
    assert hpctrain("fit", *SURROGATE_TINY, *_mongo_args(campaign), f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert is_complete(m)
    data = m["data"]
    assert data["kind"] == "mongodb" and data["uri"] == stack_env["MONGO_URI"]
    assert (data["database"], data["collection"]) == (campaign, "results")
    assert data["query"] == {"valid": True}
    assert data["projection"] == {**{f"inputs.{f}": 1 for f in FEATURES}, "flow": 1}  # "notes" never fetched
    assert data["document_count"] == data["rows"] == 200
    assert dt.datetime.fromisoformat(data["snapshot_time"]) >= before.replace(microsecond=0)
    assert len(data["content_sha256"]) == 64
    assert m["hyperparameters"]["model"]["in_features"] == 8

    # the same query reads the same documents -> the same content hash
    again, identity = MongoQuery(campaign, "results", {"valid": True}).fetch(
        [f"inputs.{f}" for f in FEATURES] + ["flow"]
    )
    assert identity["content_sha256"] == data["content_sha256"] and len(again) == 200

    # the snapshot in the job dir keeps a requeued attempt on the same rows
    snapshots = list((job / "data").glob("mongo-*.parquet"))
    assert len(snapshots) == 1


def test_empty_query_is_a_config_error_before_compute(
    hpctrain, campaign, stack_env, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MONGO_URI", stack_env["MONGO_URI"])
    job = tmp_path / "job"
    rc = hpctrain("fit", *SURROGATE_TINY, *_mongo_args(campaign, "empty"), f"--run.job_dir={job}")
    assert rc == 2
    assert "no documents" in capsys.readouterr().err
    assert not (job / "checkpoints").exists() and not (job / "data").exists()
