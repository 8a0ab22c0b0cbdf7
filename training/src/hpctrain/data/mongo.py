"""Reading a training table from MongoDB: one query, one snapshot, one identity.

Only portable features are used (``find`` with filter/projection/sort, ``count_documents``), so
the code runs against MongoDB and wire-compatible servers alike (nx-27017 on the local stack).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd

from hpctrain.data.identity import canonical_json, hash_documents, redact_uri
from hpctrain.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class MongoQuery:
    """Which documents to train on.

    :param database: database name.
    :param collection: collection name.
    :param query: filter document, e.g. ``{"campaign": "2024-06", "valid": true}``.
    :param projection: fields to return (``None``: the feature and target fields the data module
        asks for).
    :param limit: at most this many documents (0: all).
    :param uri: connection URI; leave unset to read it from ``uri_env`` so credentials stay out
        of config files, job scripts and logs.
    :param uri_env: environment variable holding the URI when ``uri`` is unset.
    :param timeout_ms: server selection timeout of one attempt.
    :param wait_s: how long an unreachable server is waited for, in attempts with a growing pause
        (5 s doubling to 60 s), before the job fails: a database restarting as the job starts
        should not cost the allocation. A query the server rejects fails at once.
    """

    database: str
    collection: str
    query: dict[str, Any] = field(default_factory=dict)
    projection: dict[str, Any] | None = None
    limit: int = 0
    uri: str | None = None
    uri_env: str = "MONGO_URI"
    timeout_ms: int = 5000
    wait_s: float = 300.0

    def resolved_uri(self) -> str:
        uri = self.uri or os.environ.get(self.uri_env)
        if not uri:
            raise ConfigError(
                f"MongoDB source: set data.mongo.uri or the {self.uri_env} environment variable"
            )
        return uri

    def describe(self) -> dict[str, Any]:
        """The query without credentials (what manifests and cache keys use)."""
        return {
            "uri": redact_uri(self.resolved_uri()),
            "database": self.database,
            "collection": self.collection,
            "query": self.query,
            "projection": self.projection,
            "limit": self.limit,
        }

    def _client(self) -> Any:
        from pymongo import MongoClient

        return MongoClient(self.resolved_uri(), serverSelectionTimeoutMS=self.timeout_ms, tz_aware=True)

    def _reading(self, read: Callable[[Any], T], what: str) -> T:
        """``read(client)``, retried while the server is unreachable, pausing at most
        :attr:`wait_s` in all (each attempt adds its server selection timeout)."""
        from pymongo.errors import ConnectionFailure, PyMongoError

        waited, pause = 0.0, 5.0
        while True:
            client = self._client()
            try:
                return read(client)
            except ConnectionFailure as exc:  # unreachable (incl. server selection timeout): wait
                if waited + pause > self.wait_s:
                    raise RuntimeError(f"MongoDB {redact_uri(self.resolved_uri())} unreachable for "
                                       f"{self.wait_s:.0f} s ({what}): {exc}") from exc
                log.warning("MongoDB %s unreachable (%s), trying again in %.0f s: %s",
                            redact_uri(self.resolved_uri()), what, pause, type(exc).__name__)
            except PyMongoError as exc:
                raise RuntimeError(f"MongoDB {redact_uri(self.resolved_uri())} {what} failed: {exc}") from exc
            finally:
                client.close()
            time.sleep(pause)
            waited, pause = waited + pause, min(pause * 2, 60.0)

    def count(self) -> int:
        """Number of documents the query matches (cheap pre-flight check)."""
        return self._reading(lambda c: int(c[self.database][self.collection].count_documents(self.query)), "count")

    def fetch(self, fields: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Run the query and return ``(table, identity)``.

        Documents come sorted by ``_id`` so the content hash is stable; nested documents are
        flattened to dotted column names (``inputs.pressure``).

        :param fields: fields to project when :attr:`projection` is unset.
        """
        projection = self.projection
        if projection is None and fields:
            projection = {name: 1 for name in fields}
        snapshot_time = dt.datetime.now(dt.UTC)

        def query(client: Any) -> list[dict[str, Any]]:
            cursor = client[self.database][self.collection].find(self.query, projection).sort("_id", 1)
            return list(cursor.limit(self.limit) if self.limit else cursor)

        documents = self._reading(query, "query")
        content_sha256, count = hash_documents(documents)
        identity = {
            "kind": "mongodb",
            **self.describe(),
            "projection": projection,
            "snapshot_time": snapshot_time.isoformat(),
            "document_count": count,
            "content_sha256": content_sha256,
        }
        table = pd.json_normalize([{k: v for k, v in doc.items() if k != "_id"} for doc in documents])
        return table, identity

    def cache_key(self) -> str:
        """Stable short key of the query, naming its snapshot in the job directory."""
        import hashlib

        return hashlib.sha256(canonical_json(self.describe()).encode()).hexdigest()[:16]
