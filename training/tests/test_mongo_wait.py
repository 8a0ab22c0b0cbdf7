"""A Mongo source waits for an unreachable server (bounded) instead of failing the job at once.

Regression (make chaos, stop-mongo at job-start): Mongo restarting as the job started failed
the training after one 5 s server selection, and the whole run with it.
"""

from __future__ import annotations

import pytest
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from hpctrain.data import mongo as mongo_mod
from hpctrain.data.mongo import MongoQuery


class FlakyClient:
    """A client whose reads fail with ``errors`` (one per client) and then answer."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors

    def __getitem__(self, name):
        return self

    def count_documents(self, query):
        if self.errors:
            raise self.errors.pop(0)
        return 7

    def close(self) -> None:
        pass


@pytest.fixture
def pauses(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(mongo_mod.time, "sleep", slept.append)
    return slept


def source(errors: list[Exception], **kw) -> MongoQuery:
    src = MongoQuery(database="d", collection="c", uri="mongodb://user:pw@db:27017/d", **kw)
    client = FlakyClient(errors)
    src._client = lambda: client  # type: ignore[method-assign]
    return src


def test_an_unreachable_server_is_waited_for_and_the_read_goes_on(pauses):
    down = [ServerSelectionTimeoutError("db:27017: Connection refused")] * 2
    assert source(down).count() == 7
    assert pauses == [5.0, 10.0]


def test_the_wait_is_bounded_and_the_error_names_no_credentials(pauses):
    down = [ServerSelectionTimeoutError("db:27017: Connection refused")] * 10
    with pytest.raises(RuntimeError, match="unreachable for 30 s") as err:
        source(down, wait_s=30).count()
    assert pauses == [5.0, 10.0]  # the next pause (20 s) would end past the 30 s budget
    assert "pw" not in str(err.value)


def test_a_refused_query_fails_at_once(pauses):
    with pytest.raises(RuntimeError, match="count failed"):
        source([OperationFailure("not authorized")]).count()
    assert pauses == []
