"""``hpctrain produce``: one rank of a producer ensemble (the seed's ``data_uploader.py``).

``srun -n $((replicas * ranks_per_replica)) python -m hpctrain produce --replicas R
--ranks-per-replica K ...`` starts the whole ensemble: each task takes its replica and rank from
``SLURM_PROCID`` (replica = procid // K, rank = procid % K; ``--replica``/``--rank`` override).
Every ``interval_s`` for ``rounds`` rounds a rank puts a batch of the reference data: rank ``r``
draws samples from a Gaussian centred at ``r`` and labels them ``r`` (so the classes are the ranks
of one replica). Global producer 0 publishes the data set's info first; each producer marks itself
done at the end. Keys and semantics: :mod:`hpctrain.staging`.

Exit codes: 0 done, 2 bad arguments, 1 the store did not come up (message on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hpctrain.job import JOB_DIR_ENV
from hpctrain.staging import (
    CURSOR_FILE,
    DatasetInfo,
    StagingStore,
    StoreAddress,
    StoreUnavailable,
    producer_prefix,
    read_cursor,
)

log = logging.getLogger("hpctrain.produce")


@dataclass(frozen=True)
class ProducerPlace:
    """Where one producer sits in the ensemble."""

    replica: int
    rank: int
    replicas: int
    ranks_per_replica: int

    @property
    def global_index(self) -> int:
        return self.replica * self.ranks_per_replica + self.rank

    @classmethod
    def resolve(cls, replicas: int, ranks_per_replica: int, replica: int | None = None, rank: int | None = None,
                environ: Mapping[str, str] | None = None) -> ProducerPlace:
        """From explicit values, else from ``SLURM_PROCID`` (checked against ``SLURM_NTASKS``).

        :raises ValueError: a place outside the ensemble, or a step of the wrong size.
        """
        env = os.environ if environ is None else environ
        if replicas < 1 or ranks_per_replica < 1:
            raise ValueError("replicas and ranks_per_replica must be >= 1")
        if replica is None or rank is None:
            procid = int(env.get("SLURM_PROCID", "0"))
            ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
            if ntasks is not None and int(ntasks) != replicas * ranks_per_replica:
                raise ValueError(f"the step has {ntasks} tasks, the ensemble needs "
                                 f"{replicas} x {ranks_per_replica} = {replicas * ranks_per_replica}")
            replica = procid // ranks_per_replica if replica is None else replica
            rank = procid % ranks_per_replica if rank is None else rank
        if not (0 <= replica < replicas and 0 <= rank < ranks_per_replica):
            raise ValueError(f"replica {replica} / rank {rank} outside {replicas} x {ranks_per_replica}")
        return cls(replica, rank, replicas, ranks_per_replica)


def all_prefixes(namespace: str, name: str, replicas: int, ranks_per_replica: int) -> list[str]:
    return [producer_prefix(namespace, name, r, k) for r in range(replicas) for k in range(ranks_per_replica)]


def reference_batch(place: ProducerPlace, iteration: int, batch_size: int, features: int, scale: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's data: ``N(rank, scale)`` samples labelled ``rank``; a pure function of its inputs."""
    rng = np.random.default_rng([seed, place.replica, place.rank, iteration])
    samples = rng.normal(loc=float(place.rank), scale=scale, size=(batch_size, features)).astype(np.float32)
    return samples, np.full((batch_size,), place.rank, dtype=np.int64)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpctrain produce", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="ensemble members (default 2)")
    p.add_argument("--ranks-per-replica", type=int, default=2, help="ranks per member = classes (default 2)")
    p.add_argument("--replica", type=int, help="this process's member (default: from SLURM_PROCID)")
    p.add_argument("--rank", type=int, help="this process's rank in its member (default: from SLURM_PROCID)")
    p.add_argument("--rounds", type=int, default=10, help="batches each rank puts (default 10)")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between batches (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    p.add_argument("--features", type=int, default=16, help="values per sample (default 16)")
    p.add_argument("--scale", type=float, default=2.0, help="standard deviation of the Gaussian (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-buffered-batches", type=int, default=64,
                   help="backpressure: wait while the store holds this many unconsumed batches (default 64)")
    p.add_argument("--name", default="producer", help="ensemble name, the key prefix (default producer)")
    p.add_argument("--namespace", help="key namespace (default $SLURMFLOW_STAGING_NAMESPACE or hpctrain)")
    p.add_argument("--address", help="host:port (default $SLURMFLOW_STAGING_ADDRESS); the password comes "
                   "from $SLURMFLOW_STAGING_PASSWORD or the file $SLURMFLOW_STAGING_PASSWORD_FILE")
    p.add_argument("--start-from", help="the trainer's cursor file: start at its iteration (default "
                   f"$HPCTRAIN_JOB_DIR/{CURSOR_FILE} when that is set)")
    p.add_argument("--connect-timeout-s", type=float, default=60.0,
                   help="give up when the store does not answer for this long (default 60)")
    return p


def run(args: argparse.Namespace) -> int:
    place = ProducerPlace.resolve(args.replicas, args.ranks_per_replica, args.replica, args.rank)
    store = StagingStore.connect(StoreAddress.from_env(args.address), args.namespace, args.connect_timeout_s)
    prefix = producer_prefix(store.namespace, args.name, place.replica, place.rank)
    if place.global_index == 0:
        info = DatasetInfo(num_classes=args.ranks_per_replica, sample_shape=[args.features], dtype="float32",
                           label_dtype="int64",
                           producers=all_prefixes(store.namespace, args.name, args.replicas, args.ranks_per_replica),
                           max_buffered_batches=args.max_buffered_batches)
        store.publish_info(info)
    store.heartbeat(prefix)
    # A restarted producer continues its numbering; in a requeued job (a new, empty store) it
    # starts at the trainer's checkpointed cursor, so no batch is skipped or produced twice.
    resume = read_cursor(args.start_from).get(prefix, 0) if args.start_from else 0
    start = store.start_at(prefix, resume)
    for iteration in range(start, args.rounds):
        samples, labels = reference_batch(place, iteration, args.batch_size, args.features, args.scale, args.seed)
        put = store.put_batch(prefix, samples, labels, args.max_buffered_batches)
        log.info("%s: batch %d put (%d samples)", prefix, put, len(labels))
        if iteration + 1 < args.rounds:
            _sleep_with_heartbeat(store, prefix, args.interval_s)
    store.mark_done(prefix, args.rounds)
    log.info("%s: done after %d batches", prefix, args.rounds)
    return 0


def _sleep_with_heartbeat(store: StagingStore, prefix: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        store.heartbeat(prefix)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if args.start_from is None and os.environ.get(JOB_DIR_ENV):
        args.start_from = os.path.join(os.environ[JOB_DIR_ENV], CURSOR_FILE)
    # The preemption signal is the trainer's (it checkpoints): producers keep producing meanwhile.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    for name in ("rounds", "batch_size", "features", "max_buffered_batches"):
        if getattr(args, name) < 1:
            print(f"hpctrain produce: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.interval_s < 0 or args.scale <= 0:
        print("hpctrain produce: --interval-s must be >= 0 and --scale > 0", file=sys.stderr)
        return 2
    try:
        return run(args)
    except ValueError as exc:
        print(f"hpctrain produce: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"hpctrain produce: {exc}", file=sys.stderr)
        return 1
