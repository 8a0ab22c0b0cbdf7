"""The staging store of online training: SmartSim's Orchestrator semantics over a plain Redis.

Producers (simulation ranks, :mod:`hpctrain.produce`) put batches of samples and labels; the
trainer (:class:`hpctrain.data.online.OnlineDataModule`) picks them up while it trains. The keys,
all under one namespace ``ns`` (default ``hpctrain``, ``$SLURMFLOW_STAGING_NAMESPACE``):

==============================  ============================================================
``{ns}:info``                   the data set's info, JSON, written once by producer 0 (SET NX):
                                classes, sample shape, dtypes, the producer prefixes
``{ns}:buffered``               how many batches are in the store and not yet consumed
``{prefix}:batch:{i}``          batch ``i`` of one producer (a hash: ``samples``, ``labels``
                                raw bytes; ``meta`` JSON: shapes, dtypes, ``n``, ``put_time``)
``{prefix}:next``               how many batches this producer has put (its next iteration)
``{prefix}:heartbeat``          a counter the producer bumps on every put and while it waits
``{prefix}:done``               the producer's done mark: JSON ``{batches, finished_at}``
==============================  ============================================================

``prefix`` is ``{ns}:{name}_{replica}:{rank}`` (SmartSim: the ensemble member's key prefix and
the rank's sub-index). A put is one Lua script, so the backpressure bound is exact: it refuses
while ``{ns}:buffered`` holds ``max_buffered_batches`` and the producer waits. Consumers trim a
batch (``DEL`` + decrement, also one script) once they hold it elsewhere.

The address comes from the job environment (``$SLURMFLOW_STAGING_ADDRESS``, ``host:port``), the
password from ``$SLURMFLOW_STAGING_PASSWORD`` (the job's secrets file, passed by name) or the file
``$SLURMFLOW_STAGING_PASSWORD_FILE`` names; never from the command line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ADDRESS_ENV = "SLURMFLOW_STAGING_ADDRESS"
PASSWORD_ENV = "SLURMFLOW_STAGING_PASSWORD"
PASSWORD_FILE_ENV = "SLURMFLOW_STAGING_PASSWORD_FILE"
NAMESPACE_ENV = "SLURMFLOW_STAGING_NAMESPACE"
DEFAULT_NAMESPACE = "hpctrain"

_PUT = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'samples', ARGV[2], 'labels', ARGV[3], 'meta', ARGV[4])
redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], tonumber(ARGV[5]) + 1)
redis.call('INCR', KEYS[4])
return 1
"""
_TRIM = """
if redis.call('DEL', KEYS[1]) == 1 then return redis.call('DECR', KEYS[2]) end
return -1
"""


class StoreUnavailable(RuntimeError):
    """The staging store did not answer (in time), or refused the password."""


@dataclass(frozen=True)
class StoreAddress:
    """Where the store listens and its password (never printed).

    :param host: host name or address.
    :param port: TCP port.
    :param password: the ``requirepass`` password, or None.
    """

    host: str
    port: int
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, address: str | None = None, environ: Mapping[str, str] | None = None) -> StoreAddress:
        """The address from ``address`` or ``$SLURMFLOW_STAGING_ADDRESS``, the password from the environment.

        :raises ValueError: no address, or not ``host:port``.
        """
        env = os.environ if environ is None else environ
        value = address or env.get(ADDRESS_ENV, "")
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"staging store address must be host:port (${ADDRESS_ENV}), got {value!r}")
        password = env.get(PASSWORD_ENV) or None
        if password is None and env.get(PASSWORD_FILE_ENV):
            password = Path(env[PASSWORD_FILE_ENV]).read_text(encoding="utf-8").strip() or None
        return cls(host.strip("[]"), int(port), password)


#: The trainer's cursor, relative to the job directory: JSON ``{"cursor": {prefix: next iteration}}``,
#: rewritten with every checkpoint; a requeued job's producers start from it (``produce --start-from``).
CURSOR_FILE = "data/online/cursor.json"


def read_cursor(path: str | os.PathLike[str]) -> dict[str, int]:
    """The cursor a checkpoint holds (empty when there is no checkpoint yet)."""
    try:
        return {k: int(v) for k, v in json.loads(Path(path).read_text(encoding="utf-8"))["cursor"].items()}
    except FileNotFoundError:
        return {}


def write_cursor(path: str | os.PathLike[str], cursor: Mapping[str, int]) -> None:
    """Atomically replace the cursor file (a reader never sees half of it)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"cursor": dict(cursor)}, sort_keys=True), encoding="utf-8")
    tmp.replace(target)


def producer_prefix(namespace: str, name: str, replica: int, rank: int) -> str:
    """Key prefix of one producer: rank ``rank`` of ensemble member ``{name}_{replica}``."""
    return f"{namespace}:{name}_{replica}:{rank}"


@dataclass
class DatasetInfo:
    """What producer 0 publishes once (SmartSim's ``TrainingDataUploader.publish_info``)."""

    num_classes: int
    sample_shape: list[int]
    dtype: str
    label_dtype: str
    producers: list[str]
    max_buffered_batches: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetInfo:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ProducerStatus:
    """One producer as the store shows it now."""

    prefix: str
    put: int  # batches put so far (= its next iteration)
    done: int | None  # batches it reported when it marked itself done, else None
    heartbeat: int


@dataclass
class Batch:
    """One batch as stored: samples, labels and when it was put (producer's clock)."""

    samples: np.ndarray
    labels: np.ndarray
    put_time: float

    @property
    def n(self) -> int:
        return int(self.samples.shape[0])


def _batch(raw: Mapping[bytes, bytes]) -> Batch:
    meta = json.loads(raw[b"meta"])
    samples = np.frombuffer(raw[b"samples"], dtype=meta["dtype"]).reshape(meta["shape"])
    labels = np.frombuffer(raw[b"labels"], dtype=meta["label_dtype"]).reshape(meta["label_shape"])
    return Batch(samples.copy(), labels.copy(), float(meta["put_time"]))


class StagingStore:
    """Client of the staging store (one Redis connection).

    :param client: a ``redis.Redis`` client (``decode_responses=False``).
    :param namespace: the key namespace of this job.
    """

    def __init__(self, client: Any, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.client = client
        self.namespace = namespace
        self._put = client.register_script(_PUT)
        self._trim = client.register_script(_TRIM)

    @classmethod
    def connect(cls, address: StoreAddress, namespace: str | None = None, wait_s: float = 60.0,
                poll_s: float = 0.5, alive: Callable[[], bool] | None = None) -> StagingStore:
        """Connect and ``PING`` until the store answers, for at most ``wait_s`` seconds.

        :param alive: for the one who started the server: False once it has exited (stop waiting).
        :raises StoreUnavailable: with the reason (refused, timed out, wrong password, exited).
        """
        import redis

        client = redis.Redis(host=address.host, port=address.port, password=address.password,
                             socket_connect_timeout=5, socket_timeout=30)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError as exc:
                raise StoreUnavailable(f"staging store {address} refused the password: {exc}") from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if alive is not None and not alive():
                    raise StoreUnavailable(f"staging store {address} exited before it answered: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"staging store {address} did not answer within {wait_s:g}s: {exc}") from exc
                time.sleep(poll_s)
            except redis.ResponseError as exc:  # NOAUTH: a password is required and none was given
                raise StoreUnavailable(f"staging store {address}: {exc}") from exc
        return cls(client, namespace or os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE)

    # -- keys ---------------------------------------------------------------------------------
    @property
    def info_key(self) -> str:
        return f"{self.namespace}:info"

    @property
    def buffered_key(self) -> str:
        return f"{self.namespace}:buffered"

    @staticmethod
    def batch_key(prefix: str, iteration: int) -> str:
        return f"{prefix}:batch:{iteration}"

    # -- info ---------------------------------------------------------------------------------
    def publish_info(self, info: DatasetInfo) -> bool:
        """Write the data set's info once; False when it was already there."""
        return bool(self.client.set(self.info_key, info.to_json(), nx=True))

    def info(self) -> DatasetInfo | None:
        raw = self.client.get(self.info_key)
        return DatasetInfo.from_json(raw) if raw is not None else None

    # -- producer side ------------------------------------------------------------------------
    def start_at(self, prefix: str, iteration: int) -> int:
        """Number this producer's batches from ``iteration`` on (a requeued job's producers resume
        at the trainer's cursor: the batches below it are already in the trainer's checkpoint).
        Never moves backwards; returns the producer's next iteration."""
        key = f"{prefix}:next"
        if int(self.client.get(key) or 0) < iteration:
            self.client.set(key, iteration)
        return self.next_iteration(prefix)

    def next_iteration(self, prefix: str) -> int:
        """The iteration the producer's next batch gets (a restarted producer continues)."""
        return int(self.client.get(f"{prefix}:next") or 0)

    def try_put(self, prefix: str, iteration: int, samples: np.ndarray, labels: np.ndarray,
                max_buffered: int) -> bool:
        """Put batch ``iteration`` unless the store holds ``max_buffered`` unconsumed batches."""
        if samples.shape[0] != labels.shape[0]:
            raise ValueError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
        meta = {"shape": list(samples.shape), "dtype": str(samples.dtype), "label_shape": list(labels.shape),
                "label_dtype": str(labels.dtype), "n": int(samples.shape[0]), "put_time": time.time()}
        keys = [self.batch_key(prefix, iteration), self.buffered_key, f"{prefix}:next", f"{prefix}:heartbeat"]
        args = [max_buffered, np.ascontiguousarray(samples).tobytes(), np.ascontiguousarray(labels).tobytes(),
                json.dumps(meta), iteration]
        return bool(self._put(keys=keys, args=args))

    def put_batch(self, prefix: str, samples: np.ndarray, labels: np.ndarray, max_buffered: int,
                  poll_s: float = 0.1, timeout_s: float | None = None,
                  on_wait: Callable[[], None] | None = None) -> int:
        """Put the producer's next batch, blocking while the store is full (backpressure).

        :return: the batch's iteration.
        :raises TimeoutError: still full after ``timeout_s``.
        """
        iteration = self.next_iteration(prefix)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.try_put(prefix, iteration, samples, labels, max_buffered):
            self.heartbeat(prefix)  # blocked by a slow trainer is not dead
            if on_wait is not None:
                on_wait()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{prefix}: the store stayed full ({max_buffered} batches) for {timeout_s}s")
            time.sleep(poll_s)
        return iteration

    def heartbeat(self, prefix: str) -> None:
        self.client.incr(f"{prefix}:heartbeat")

    def mark_done(self, prefix: str, batches: int) -> None:
        self.client.set(f"{prefix}:done", json.dumps({"batches": batches, "finished_at": time.time()}))

    # -- consumer side ------------------------------------------------------------------------
    def status(self, prefixes: Sequence[str]) -> list[ProducerStatus]:
        """Every listed producer's progress in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for prefix in prefixes:
            pipe.get(f"{prefix}:next")
            pipe.get(f"{prefix}:done")
            pipe.get(f"{prefix}:heartbeat")
        raw = pipe.execute()
        out = []
        for k, prefix in enumerate(prefixes):
            put, done, beat = raw[3 * k: 3 * k + 3]
            out.append(ProducerStatus(prefix, int(put or 0), json.loads(done)["batches"] if done else None,
                                      int(beat or 0)))
        return out

    def metas(self, keys: Sequence[tuple[str, int]]) -> list[dict[str, Any] | None]:
        """The ``meta`` of each ``(prefix, iteration)``, None for a batch no longer stored."""
        pipe = self.client.pipeline(transaction=False)
        for prefix, iteration in keys:
            pipe.hget(self.batch_key(prefix, iteration), "meta")
        return [json.loads(raw) if raw is not None else None for raw in pipe.execute()]

    def get_batch(self, prefix: str, iteration: int) -> Batch | None:
        """Batch ``iteration`` of ``prefix``, or None when it is not (or no longer) stored."""
        return self.get_batches([(prefix, iteration)])[0]

    def get_batches(self, keys: Sequence[tuple[str, int]]) -> list[Batch | None]:
        """Each ``(prefix, iteration)``'s batch (None: not stored), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for prefix, iteration in keys:
            pipe.hgetall(self.batch_key(prefix, iteration))
        return [_batch(raw) if raw else None for raw in pipe.execute()]

    def trim(self, prefix: str, iteration: int) -> bool:
        """Delete a consumed batch; False when it was already gone."""
        return self.trim_many([(prefix, iteration)]) == 1

    def trim_many(self, keys: Sequence[tuple[str, int]]) -> int:
        """Delete consumed batches in one round trip; how many were still there."""
        if not keys:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for prefix, iteration in keys:
            self._trim(keys=[self.batch_key(prefix, iteration), self.buffered_key], client=pipe)
        return sum(1 for left in pipe.execute() if int(left) >= 0)

    def buffered(self) -> int:
        return int(self.client.get(self.buffered_key) or 0)

    def stored_batches(self) -> int:
        """Batch keys present now (a SCAN: for tests and diagnostics, not the hot path)."""
        return sum(1 for _ in self.client.scan_iter(match=f"{self.namespace}:*:batch:*", count=1000))
