"""LightningModules of the reference tasks."""

from __future__ import annotations

from hpctrain.tasks.base import TaskModule
from hpctrain.tasks.segmentation import ClimateSegmenter
from hpctrain.tasks.surrogate import SurrogateRegressor

__all__ = ["ClimateSegmenter", "SurrogateRegressor", "TaskModule"]
