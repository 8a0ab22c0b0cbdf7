"""Tabular regression data (surrogate models) from a Parquet/CSV file or a MongoDB query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from hpctrain.data.base import HpcDataModule
from hpctrain.data.identity import sha256_file
from hpctrain.data.mongo import MongoQuery
from hpctrain.data.tensor_table import TensorTable
from hpctrain.errors import ConfigError

FileFormat = Literal["auto", "parquet", "csv"]


def _file_format(path: Path, file_format: FileFormat) -> str:
    if file_format != "auto":
        return file_format
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".txt"):
        return "csv"
    raise ConfigError(f"cannot tell the format of {path} from its suffix; set data.file_format")


def _read_columns(path: Path, fmt: str) -> list[str]:
    """Column names without reading the data (Parquet footer, CSV header)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0).columns)


class TabularDataModule(HpcDataModule):
    """Feature columns in, target columns out, from exactly one of ``path`` or ``mongo``.

    Rows are split into train/validation by a seeded permutation (``split_seed``), independent of
    the training seed so that a sweep over seeds keeps one validation set.

    :param features: input columns (dotted names address nested Mongo fields).
    :param targets: output columns.
    :param path: Parquet or CSV file (relative paths resolve against the job directory's cwd).
    :param mongo: a MongoDB query instead of a file.
    :param file_format: ``auto`` decides by suffix.
    :param val_fraction: share of rows held out for validation.
    :param split_seed: seed of the train/validation split.
    :param batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param eval_batch_size: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param num_workers: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param shuffle_seed: see :class:`~hpctrain.data.base.HpcDataModule`.
    :param cache_dir: see :class:`~hpctrain.data.base.HpcDataModule`.
    """

    def __init__(
        self,
        features: list[str],
        targets: list[str],
        path: str | None = None,
        mongo: MongoQuery | None = None,
        file_format: FileFormat = "auto",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, cache_dir)
        if (path is None) == (mongo is None):
            raise ConfigError("data: give exactly one of `path` (Parquet/CSV file) or `mongo` (query)")
        if not features or not targets:
            raise ConfigError("data: `features` and `targets` must each name at least one column")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.features = list(features)
        self.targets = list(targets)
        self.path = path
        self.mongo = mongo
        self.file_format = file_format
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    # -- validation before compute ----------------------------------------------------------
    def check(self) -> None:
        if self.path is not None:
            path = Path(self.path)
            if not path.is_file():
                raise ConfigError(f"data.path: file not found: {path.resolve()}")
            columns = _read_columns(path, _file_format(path, self.file_format))
            self._require_columns(columns, str(path))
        elif not self._snapshot_paths()[0].exists():
            assert self.mongo is not None
            count = self.mongo.count()
            if count == 0:
                where = f"{self.mongo.database}.{self.mongo.collection}"
                raise ConfigError(f"data.mongo: no documents in {where} match {json.dumps(self.mongo.query)}")

    def _require_columns(self, columns: list[str], where: str) -> None:
        missing = [c for c in self.features + self.targets if c not in columns]
        if missing:
            raise ConfigError(f"data: columns {missing} not in {where} (has {sorted(columns)})")

    # -- Mongo snapshot -------------------------------------------------------------------
    def _snapshot_paths(self) -> tuple[Path, Path]:
        assert self.mongo is not None
        stem = self.cache_dir / f"mongo-{self.mongo.cache_key()}"
        return stem.with_suffix(".parquet"), stem.with_suffix(".identity.json")

    def prepare_data(self) -> None:
        # Rank 0 queries once and writes a snapshot; every rank (and every requeued attempt)
        # then reads the same rows, even if the collection changes meanwhile.
        if self.mongo is None:
            return
        table_path, identity_path = self._snapshot_paths()
        if table_path.exists() and identity_path.exists():
            return
        table, identity = self.mongo.fetch(self.features + self.targets)
        if table.empty:
            raise ConfigError(
                f"data.mongo: the query returned no documents ({identity['database']}.{identity['collection']})"
            )
        table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = table_path.with_suffix(".parquet.tmp")
        table.to_parquet(tmp, index=False)
        tmp.replace(table_path)
        identity["snapshot_path"] = str(table_path)
        identity_path.write_text(json.dumps(identity, indent=2, default=str))

    # -- loading ----------------------------------------------------------------------------
    def _load(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        if self.path is not None:
            path = Path(self.path).resolve()
            fmt = _file_format(path, self.file_format)
            table = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
            identity = {
                "kind": "file",
                "path": str(path),
                "format": fmt,
                "size_bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
            return table, identity
        table_path, identity_path = self._snapshot_paths()
        if not table_path.exists():
            self.prepare_data()  # used outside a Trainer (evaluation)
        return pd.read_parquet(table_path), json.loads(identity_path.read_text())

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        table, identity = self._load()
        self._require_columns(list(table.columns), identity.get("path") or "the query result")
        try:
            x = torch.from_numpy(table[self.features].to_numpy(dtype=np.float32, copy=True))
            y = torch.from_numpy(table[self.targets].to_numpy(dtype=np.float32, copy=True))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data: feature/target columns must be numeric: {exc}") from exc
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ConfigError("data: feature/target columns contain NaN or infinite values")
        n = len(table)
        n_val = int(round(n * self.val_fraction))
        if n - n_val < 1:
            raise ConfigError(f"data: {n} rows leave no training rows at val_fraction={self.val_fraction}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        self._splits = {
            "train": TensorTable(x[train_idx], y[train_idx]),
            "val": TensorTable(x[val_idx], y[val_idx]),
            "all": TensorTable(x, y),
        }
        train_x, train_y = x[train_idx], y[train_idx]
        self._stats = {
            "x_mean": train_x.mean(0),
            "x_std": train_x.std(0, unbiased=False).clamp_min(1e-8),
            "y_mean": train_y.mean(0),
            "y_std": train_y.std(0, unbiased=False).clamp_min(1e-8),
        }
        self._identity = {
            **identity,
            "rows": n,
            "train_rows": n - n_val,
            "val_rows": n_val,
            "features": self.features,
            "targets": self.targets,
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
        }

    def model_dims(self) -> dict[str, Any]:
        """Input/output widths and standardization statistics of the training split."""
        return {"in_features": len(self.features), "out_features": len(self.targets), **self._stats}
