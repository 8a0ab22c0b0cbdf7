"""LightningDataModules of the reference tasks and the pieces they share."""

from __future__ import annotations

from hpctrain.data.base import HpcDataModule
from hpctrain.data.climate import ClimateSegmentationDataModule
from hpctrain.data.mongo import MongoQuery
from hpctrain.data.tabular import TabularDataModule

__all__ = ["ClimateSegmentationDataModule", "HpcDataModule", "MongoQuery", "TabularDataModule"]
