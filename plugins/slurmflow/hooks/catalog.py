"""RunCatalogHook: the MongoDB run catalog, one document per training run.

Built on the mongo provider's :class:`MongoHook` (connection ``mongo_default``). Every write is an
upsert on the run key (unique index), so re-running a task never duplicates a document; each
state change is appended to ``history``. Only portable MongoDB features are used (no change
streams, no reliance on index names), so any wire-compatible server works.
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import Any

from airflow.providers.mongo.hooks.mongo import MongoHook

RUNS = "runs"
SWEEPS = "sweeps"
#: one document per staged-pipeline run (experiment_pipeline): stage keys, dataset key, report
PIPELINES = "pipelines"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunCatalogHook:
    """Upserts run and sweep documents.

    :param mongo_conn_id: Airflow connection of the catalog; its ``schema`` is the database.
    :param database: overrides the connection's database.
    """

    def __init__(self, mongo_conn_id: str = "mongo_default", database: str | None = None) -> None:
        self.mongo_conn_id = mongo_conn_id
        self._database = database

    @cached_property
    def hook(self) -> MongoHook:
        return MongoHook(mongo_conn_id=self.mongo_conn_id)

    @cached_property
    def db(self):
        name = self._database or self.hook.connection.schema or "slurmflow"
        db = self.hook.get_conn()[name]
        db[RUNS].create_index("run_key", unique=True)
        db[SWEEPS].create_index("sweep_key", unique=True)
        db[PIPELINES].create_index("run_key", unique=True)
        db[PIPELINES].create_index("dataset_key")
        return db

    def record_run(self, run_key: str, state: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create or update the run's document and append ``state`` to its history.

        A repeated call with the same state adds no second history entry, so a retried task
        leaves the document as one attempt would.

        :param run_key: the deterministic key of the run (dag, run, task, map index).
        :param state: e.g. ``submitted``, ``completed``, ``registered``, ``failed``.
        :param fields: fields to set (links to the MLflow run, model version, Slurm job, image).
        :return: the document after the update.
        """
        now = _now()
        coll = self.db[RUNS]
        doc = coll.find_one({"run_key": run_key}) or {}
        history = list(doc.get("history") or [])
        if not history or history[-1]["state"] != state:
            history.append({"state": state, "at": now})
        # One $set of the whole history rather than $push: some wire-compatible servers store a
        # pushed sub-document as a string. One task owns a run key, so there is no write race.
        coll.update_one(
            {"run_key": run_key},
            {"$set": {**(fields or {}), "state": state, "updated_at": now, "history": history},
             "$setOnInsert": {"created_at": now}},
            upsert=True,
        )
        return coll.find_one({"run_key": run_key})

    def record_sweep(self, sweep_key: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Create or replace the summary document of a hyperparameter sweep.

        :param sweep_key: the sweep's key (dag run).
        :param fields: trials, best trial, search space, links.
        """
        now = _now()
        self.db[SWEEPS].update_one(
            {"sweep_key": sweep_key},
            {"$set": {**fields, "updated_at": now}, "$setOnInsert": {"sweep_key": sweep_key, "created_at": now}},
            upsert=True,
        )
        return self.db[SWEEPS].find_one({"sweep_key": sweep_key})

    def record_pipeline(self, run_key: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Create or update the document of one ``experiment_pipeline`` run (upsert on its key).

        :param run_key: ``<dag_id>/<run_id>/pipeline``.
        :param fields: ``stages`` (per stage: key, params, inputs' hashes, cached, job id),
            ``dataset_key`` (the prepare stage's key), ``dataset_hash``, ``report``, ``state``.
        """
        now = _now()
        self.db[PIPELINES].update_one(
            {"run_key": run_key},
            {"$set": {**fields, "updated_at": now}, "$setOnInsert": {"run_key": run_key, "created_at": now}},
            upsert=True,
        )
        return self.db[PIPELINES].find_one({"run_key": run_key})

    def runs_using_dataset(self, dataset_key: str) -> list[dict[str, Any]]:
        """Which pipeline runs used this dataset: the prepare stage's key (a cached prepare counts:
        the run used the entry someone else computed), oldest first.

        :param dataset_key: the ``prepare`` stage's key (MLflow param ``prepare.key``).
        """
        docs = self.db[PIPELINES].find({"dataset_key": dataset_key}, {"_id": 0})
        return sorted(docs, key=lambda d: d.get("created_at") or _now())

    def get_run(self, run_key: str) -> dict[str, Any] | None:
        return self.db[RUNS].find_one({"run_key": run_key}, {"_id": 0})
