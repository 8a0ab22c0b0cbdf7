"""A training set that grows while training: SmartSim's ``DynamicDataGenerator`` as a DataModule.

Producers (:mod:`hpctrain.produce`) put batches into the staging store (:mod:`hpctrain.staging`).
At the start of every epoch (``reload_dataloaders_every_n_epochs: 1``, i.e. right after the
previous epoch ended) global rank 0 polls the producers it was told about (``producers``, default:
those the published info lists), takes every batch that arrived since its cursor (waiting until at
least one did, or every producer is finished), and broadcasts that plan. Each new batch gets the
next global number ``g``; rank ``g % world_size`` owns it (SmartSim's ``replica_rank`` /
``num_replicas``): only the owner downloads it, keeps a copy in the job directory
(``<cache_dir>/online/``) and trims it from the store. Every rank trains each epoch on all the
batches it owns, padded with zero-weight rows to the largest share, so the ranks take the same
number of steps whatever the producers delivered, and every batch is used by exactly one rank per
epoch.

Training ends after ``max_epochs``, or after the epoch that first holds every batch once all
producers are finished: done (their done mark, all batches taken) or dead (no done mark, no put and
no heartbeat for ``producer_timeout_s``: reported as a warning and in ``result.json``'s
``data.dead_producers``).

Preemption: the checkpoint holds the cursor and the list of batches taken (``state_dict``); the
batches themselves are in the job directory, so a requeued trainer rebuilds exactly the same data
set, resumes its epoch, and continues at the cursor: nothing skipped, nothing repeated.

Timing (this attempt, in ``result.json``'s ``data``): ``wait_s`` is how long rank 0 waited on the
producers (for the data set's info in ``setup``, and for new batches at the start of each epoch);
``fetch_s`` how long rank 0 took to download its share from the store and spool it. Set against
``training.attempt_seconds``, they say how much of the run was spent waiting for data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from hpctrain import environment
from hpctrain.data.base import HpcDataModule, global_seed
from hpctrain.data.sampling import EpochShuffleSampler, ResumableLoader
from hpctrain.data.tensor_table import TensorTable
from hpctrain.errors import ConfigError
from hpctrain.job import JOB_DIR_ENV, resolve_job_dir
from hpctrain.signals import process_latch
from hpctrain.staging import CURSOR_FILE, StagingStore, StoreAddress, write_cursor

log = logging.getLogger(__name__)

# registry row: [producer index, iteration, samples, put_time, taken_time, epoch]
_P, _IT, _N, _PUT, _TAKEN, _EPOCH = range(6)


class OnlineStop(Callback):
    """Stop after the epoch that trained on everything the finished producers delivered."""

    def __init__(self, datamodule: OnlineDataModule) -> None:
        self.datamodule = datamodule

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.datamodule.exhausted:
            trainer.should_stop = True


class OnlineDataModule(HpcDataModule):
    """Batches streamed from producers through the staging store; see the module docstring.

    :param producers: key prefixes of the producers to read (default: the published info's list).
    :param namespace: key namespace (default ``$SLURMFLOW_STAGING_NAMESPACE`` or ``hpctrain``).
    :param address: ``host:port`` of the store (default ``$SLURMFLOW_STAGING_ADDRESS``); the
        password only ever comes from the environment.
    :param producer_timeout_s: a producer without done mark, put or heartbeat for this long is dead.
    :param poll_interval_s: how often rank 0 polls the store while it waits.
    :param wait_for_new: each epoch waits for at least one new batch (or every producer finished);
        false: only the first epoch waits (SmartSim's generator: train on what is there).
    :param connect_timeout_s: the store must answer within this (and the info appear within
        ``producer_timeout_s``), else the job fails with the reason.
    :param batch_size: see :class:`~hpctrain.data.base.HpcDataModule` (rows per training step).
    :param eval_batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param num_workers: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param shuffle_seed: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param cache_dir: where the taken batches are kept (``<cache_dir>/online``; default the job's ``data/``).
    """

    def __init__(
        self,
        producers: list[str] | None = None,
        namespace: str | None = None,
        address: str | None = None,
        producer_timeout_s: float = 60.0,
        poll_interval_s: float = 0.2,
        wait_for_new: bool = True,
        connect_timeout_s: float = 60.0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, cache_dir)
        if producer_timeout_s <= 0 or poll_interval_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("data.producer_timeout_s, poll_interval_s and connect_timeout_s must be > 0")
        self.producers_arg, self.namespace, self.address = producers, namespace, address
        self.producer_timeout_s, self.poll_interval_s = producer_timeout_s, poll_interval_s
        self.wait_for_new, self.connect_timeout_s = wait_for_new, connect_timeout_s
        self.val_fraction = 0  # nothing held out: the command line keeps last.ckpt only
        self.store: StagingStore | None = None
        self.prefixes: list[str] = []
        self.sample_shape: list[int] = []
        self.num_classes = 0
        # The cursor state (identical on every rank; in the checkpoint).
        self.cursor: dict[str, int] = {}
        self.registry: list[list[Any]] = []
        self.dead: list[str] = []
        self.exhausted = False
        self.ingested_epoch = -1
        self._local: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._liveness: dict[str, tuple[int, int, float]] = {}
        # Seconds of this attempt (not in the checkpoint): waiting on producers, downloading batches.
        self.wait_s = 0.0
        self.fetch_s = 0.0

    # -- setup ----------------------------------------------------------------------------------
    def check(self) -> None:
        try:
            StoreAddress.from_env(self.address)
        except (ValueError, OSError) as exc:
            raise ConfigError(str(exc)) from exc

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        address = StoreAddress.from_env(self.address)
        self.store = StagingStore.connect(address, self.namespace, self.connect_timeout_s)
        started = time.monotonic()
        deadline = started + self.producer_timeout_s
        while (info := self.store.info()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no producer published the data set info ({self.store.info_key}) "
                                   f"within {self.producer_timeout_s:g}s")
            time.sleep(self.poll_interval_s)
        self.wait_s += time.monotonic() - started
        self.prefixes = list(self.producers_arg or info.producers)
        self.sample_shape, self.num_classes = list(info.sample_shape), int(info.num_classes)
        self.cursor = {p: self.cursor.get(p, 0) for p in self.prefixes}
        self._address = str(address)
        self._splits = {"train": self._empty_table()}
        trainer = self._trainer_or_none()
        if trainer is not None and not any(isinstance(c, OnlineStop) for c in trainer.callbacks):
            trainer.callbacks.append(OnlineStop(self))

    def _trainer_or_none(self) -> Any:
        try:
            return self.trainer
        except RuntimeError:
            return None

    def model_dims(self) -> dict[str, Any]:
        return {"in_features": int(math.prod(self.sample_shape)), "num_classes": self.num_classes}

    @property
    def spool(self) -> Path:
        return self.cache_dir / "online"

    # -- the cursor in the checkpoint --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Called as a checkpoint is written: the cursor also goes where a requeued job's producers
        # read it (they start there, in the new, empty store). The same on every rank: rank 0 writes.
        trainer = self._trainer_or_none()
        if self.cursor and os.environ.get(JOB_DIR_ENV) and (trainer is None or trainer.global_rank == 0):
            write_cursor(resolve_job_dir() / CURSOR_FILE, self.cursor)
        return {"prefixes": list(self.prefixes), "cursor": dict(self.cursor), "registry": [list(r) for r in self.registry],
                "dead": list(self.dead), "exhausted": self.exhausted, "ingested_epoch": self.ingested_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.prefixes and list(state_dict["prefixes"]) != self.prefixes:
            raise ConfigError(f"the checkpoint read producers {state_dict['prefixes']}, this run {self.prefixes}")
        self.prefixes = list(state_dict["prefixes"])
        self.cursor = {k: int(v) for k, v in state_dict["cursor"].items()}
        self.registry = [list(r) for r in state_dict["registry"]]
        self.dead = list(state_dict["dead"])
        self.exhausted = bool(state_dict["exhausted"])
        self.ingested_epoch = int(state_dict["ingested_epoch"])
        self._local = {}
        log.info("online data: resumed at cursor %s (%d batches taken)", self.cursor, len(self.registry))

    # -- each epoch ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError("OnlineDataModule needs trainer.reload_dataloaders_every_n_epochs: 1 "
                              "(the data set grows every epoch)")
        world, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        if self.ingested_epoch != epoch:  # else: resuming the epoch the checkpoint was taken in
            plan = self._plan() if rank == 0 else None
            plan = _broadcast(plan, world)
            self._apply(plan, epoch)
        table = self._local_table(world, rank, epoch)
        self._splits = {"train": table}
        sampler = EpochShuffleSampler(table, num_replicas=1, rank=0, shuffle=True,
                                      seed=self.shuffle_seed if self.shuffle_seed is not None else global_seed())
        return ResumableLoader(table, sampler, batch_size=self.batch_size, num_workers=self.num_workers,
                               persistent_workers=False)

    def val_dataloader(self) -> list:
        return []

    def _plan(self) -> dict[str, Any]:
        """Rank 0: wait for new batches (or the end), then name them; see the module docstring."""
        assert self.store is not None
        dead = set(self.dead)
        started = time.monotonic()
        while True:
            statuses = self.store.status(self.prefixes)
            now = time.monotonic()
            new: list[tuple[int, int, int]] = []  # (iteration, producer index, ...) for a fair order
            finished = True
            for index, st in enumerate(statuses):
                seen = self._liveness.get(st.prefix)
                if seen is None or (seen[0], seen[1]) != (st.heartbeat, st.put):
                    self._liveness[st.prefix] = (st.heartbeat, st.put, now)
                elif st.done is None and st.prefix not in dead and now - seen[2] > self.producer_timeout_s:
                    dead.add(st.prefix)
                    log.warning("producer %s is dead: no done mark and no batch for %.0fs (%d batches taken)",
                                st.prefix, self.producer_timeout_s, st.put)
                new += [(i, index, 0) for i in range(self.cursor[st.prefix], st.put)]
                if not ((st.done is not None and st.put >= st.done) or st.prefix in dead):
                    finished = False
            latch = process_latch()
            if new or finished or (self.registry and (not self.wait_for_new or (latch and latch.triggered))):
                break
            time.sleep(self.poll_interval_s)
        self.wait_s += time.monotonic() - started
        new.sort()
        keys = [(self.prefixes[p], i) for i, p, _ in new]
        metas = self.store.metas(keys)
        rows = []
        for (prefix, iteration), meta in zip(keys, metas, strict=True):
            if meta is None:  # an earlier attempt took (spooled, trimmed) it, then stopped before a checkpoint
                meta = self._spooled_meta(prefix, iteration)
            if meta is None:
                raise RuntimeError(f"batch {iteration} of {prefix} is gone from the store before it was taken")
            rows.append([self.prefixes.index(prefix), iteration, int(meta["n"]), float(meta["put_time"])])
        return {"new": rows, "dead": sorted(dead), "finished": finished, "time": time.time()}

    def _apply(self, plan: dict[str, Any], epoch: int) -> None:
        for p, iteration, n, put_time in plan["new"]:
            self.registry.append([p, iteration, n, put_time, plan["time"], epoch])
            self.cursor[self.prefixes[p]] = iteration + 1
        for prefix in plan["dead"]:
            if prefix not in self.dead:
                self.dead.append(prefix)
        self.exhausted = bool(plan["finished"])
        self.ingested_epoch = epoch
        if not self.registry:
            raise RuntimeError(f"no batch arrived from {self.prefixes} (dead: {self.dead})")
        log.info("online data: epoch %d takes %d new batch(es), %d in all%s", epoch, len(plan["new"]),
                 len(self.registry), "; every producer finished" if self.exhausted else "")

    # -- the rank's share ---------------------------------------------------------------------
    def _spool_path(self, prefix: str, iteration: int) -> Path:
        return self.spool / prefix.replace(":", "_") / f"{iteration:08d}.npz"

    def _spooled_meta(self, prefix: str, iteration: int) -> dict[str, Any] | None:
        """``n`` and ``put_time`` of a batch kept in the job directory, or None.

        The spool, not the store, is where a taken batch lives: the store copy is trimmed as soon
        as the spool has it, and a preemption signal during start-up stops the trainer before any
        checkpoint recorded the taking (PreemptionCallback saves nothing then)."""
        path = self._spool_path(prefix, iteration)
        if not path.exists():
            return None
        with np.load(path) as data:
            put_time = float(data["put_time"]) if "put_time" in data.files else time.time()
            return {"n": int(data["labels"].shape[0]), "put_time": put_time}

    def _fetch(self, owned: list[int], rank: int, epoch: int) -> None:
        """Bring this rank's batches ``owned`` into memory: from the spool when a copy is there,
        else from the store in one round trip, each kept in the spool before the store's copy is
        trimmed (one more round trip for all of them)."""
        assert self.store is not None
        todo: list[tuple[int, str, int, Path]] = []
        trims: list[tuple[str, int]] = []
        for g in owned:
            row = self.registry[g]
            prefix, iteration = self.prefixes[row[_P]], int(row[_IT])
            path = self._spool_path(prefix, iteration)
            if path.exists():
                with np.load(path) as data:
                    self._local[g] = (torch.from_numpy(data["samples"].copy()), torch.from_numpy(data["labels"].copy()))
                # A requeued job's producers may have put it again (no checkpoint held its cursor):
                # the spool's copy is used, the store's trimmed so it does not count against the buffer.
                trims.append((prefix, iteration))
            else:
                todo.append((g, prefix, iteration, path))
        started = time.monotonic()
        batches = self.store.get_batches([(prefix, iteration) for _, prefix, iteration, _ in todo])
        for (g, prefix, iteration, path), batch in zip(todo, batches, strict=True):
            if batch is None:
                raise RuntimeError(f"batch {iteration} of {prefix} is neither in the store nor in {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
            np.savez(tmp, samples=batch.samples, labels=batch.labels, put_time=np.float64(batch.put_time))
            os.replace(tmp, path)  # kept before it is trimmed: a requeue finds it here
            self._local[g] = (torch.from_numpy(batch.samples), torch.from_numpy(batch.labels))
            trims.append((prefix, iteration))
        self.store.trim_many(trims)
        if todo:
            self.fetch_s += time.monotonic() - started
        for g, prefix, iteration, _ in todo:
            self._log(rank, {"g": g, "producer": prefix, "iteration": iteration, "n": int(self.registry[g][_N]),
                             "rank": rank, "epoch": epoch, "restart": environment.restart_count()}, "taken")

    def _local_table(self, world: int, rank: int, epoch: int) -> TensorTable:
        owned = [g for g in range(len(self.registry)) if g % world == rank]
        self._fetch([g for g in owned if g not in self._local], rank, epoch)
        shares = [sum(int(r[_N]) for g, r in enumerate(self.registry) if g % world == k) for k in range(world)]
        xs = [self._local[g][0].reshape(-1, *self.sample_shape).float() for g in owned]
        ys = [self._local[g][1].long() for g in owned]
        pad = max(shares) - shares[rank]
        xs.append(torch.zeros(pad, *self.sample_shape))
        ys.append(torch.zeros(pad, dtype=torch.long))
        weights = torch.cat([torch.ones(shares[rank]), torch.zeros(pad)])
        self._log(rank, {"epoch": epoch, "batches": owned, "samples": shares[rank], "padding": pad}, "epochs")
        return TensorTable(torch.cat(xs), torch.cat(ys), weights)

    def _log(self, rank: int, row: dict[str, Any], kind: str) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        with (self.spool / f"{kind}-rank{rank}.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _empty_table(self) -> TensorTable:
        return TensorTable(torch.zeros(0, *self.sample_shape), torch.zeros(0, dtype=torch.long), torch.zeros(0))

    # -- the manifest -------------------------------------------------------------------------
    def data_identity(self) -> dict[str, Any]:
        per_producer = {p: 0 for p in self.prefixes}
        for row in self.registry:
            per_producer[self.prefixes[row[_P]]] += 1
        staleness = sorted(max(0.0, float(r[_TAKEN]) - float(r[_PUT])) for r in self.registry)
        return {
            "kind": "online", "store": getattr(self, "_address", None), "namespace": self.store.namespace if self.store else None,
            "producers": list(self.prefixes), "batches_per_producer": per_producer,
            "batches_consumed": len(self.registry), "samples_consumed": sum(int(r[_N]) for r in self.registry),
            "cursor": dict(self.cursor), "dead_producers": list(self.dead), "all_producers_finished": self.exhausted,
            "staleness_p50_s": _quantile(staleness, 0.5), "staleness_p95_s": _quantile(staleness, 0.95),
            "sample_shape": list(self.sample_shape), "num_classes": self.num_classes,
            "wait_s": round(self.wait_s, 3), "fetch_s": round(self.fetch_s, 3),
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 4)


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (one process: ``obj`` itself)."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
