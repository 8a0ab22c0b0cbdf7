"""Reading a training table from MongoDB: one query, one snapshot, one identity.

Only portable features are used (``find`` with filter/projection/sort, ``count_documents``), so
the code runs against MongoDB and wire-compatible servers alike (nx-27017 on the local stack).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from hpctrain.data.identity import canonical_json, hash_documents, redact_uri
from hpctrain.errors import ConfigError


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
    :param timeout_ms: server selection timeout; an unreachable server fails fast.
    """

    database: str
    collection: str
    query: dict[str, Any] = field(default_factory=dict)
    projection: dict[str, Any] | None = None
    limit: int = 0
    uri: str | None = None
    uri_env: str = "MONGO_URI"
    timeout_ms: int = 5000

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

    def count(self) -> int:
        """Number of documents the query matches (cheap pre-flight check)."""
        from pymongo.errors import PyMongoError

        client = self._client()
        try:
            return int(client[self.database][self.collection].count_documents(self.query))
        except PyMongoError as exc:
            raise RuntimeError(f"MongoDB {redact_uri(self.resolved_uri())} unreachable: {exc}") from exc
        finally:
            client.close()

    def fetch(self, fields: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Run the query and return ``(table, identity)``.

        Documents come sorted by ``_id`` so the content hash is stable; nested documents are
        flattened to dotted column names (``inputs.pressure``).

        :param fields: fields to project when :attr:`projection` is unset.
        """
        from pymongo.errors import PyMongoError

        projection = self.projection
        if projection is None and fields:
            projection = {name: 1 for name in fields}
        snapshot_time = dt.datetime.now(dt.UTC)
        client = self._client()
        try:
            cursor = client[self.database][self.collection].find(self.query, projection).sort("_id", 1)
            if self.limit:
                cursor = cursor.limit(self.limit)
            documents = list(cursor)
        except PyMongoError as exc:
            raise RuntimeError(f"MongoDB {redact_uri(self.resolved_uri())} query failed: {exc}") from exc
        finally:
            client.close()
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
