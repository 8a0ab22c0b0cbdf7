"""Exported models: what the registry stores and what ``evaluate`` loads.

Two files in ``<job_dir>/model/``:

* ``model.pt``: a plain dict (format ``hpctrain.model/v1``: ``class_path``, ``init_args``,
  ``state_dict``) that loads with ``torch.load(weights_only=True)`` (no pickled code) and is
  rebuilt by :func:`load_model`. Data statistics are buffers, so the model takes raw inputs.
* ``model.pt2``: the same network as a ``torch.export`` program (batch dimension dynamic),
  loadable with ``torch.export.load(path).module()`` without hpctrain installed, for serving.
  Best effort: when export fails the manifest says so and ``model.pt`` remains the reference.

Both can be logged to MLflow as artifacts (``mlflow.log_artifacts(model_dir, "model")``), or
``load_model(...)`` handed to ``mlflow.pytorch.log_model``.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hpctrain.job import write_json_atomic
from hpctrain.tasks.base import TaskModule

log = logging.getLogger(__name__)

FORMAT = "hpctrain.model/v1"
STATE_DICT_FILE = "model.pt"
PROGRAM_FILE = "model.pt2"


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(class_path: str) -> type[TaskModule]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise TypeError(f"{class_path} is not an hpctrain TaskModule")
    return cls


def rebuild(class_path: str, init_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> TaskModule:
    """Instantiate a task from its init args and load weights (strictly), in eval mode.

    :param class_path: ``module.Class`` of a :class:`~hpctrain.tasks.base.TaskModule`.
    :param init_args: constructor arguments, including data-derived shapes.
    :param state_dict: weights and buffers.
    """
    model = _import(class_path)(**init_args)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def export_model(
    model: TaskModule,
    out_dir: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    program: bool = True,
) -> dict[str, Any]:
    """Write ``model.pt`` (and ``model.pt2`` when ``program``) plus ``export.json``.

    :param model: the trained task (its current weights are exported).
    :param out_dir: destination directory.
    :param example_input: a batch of at least two inputs, needed for ``torch.export``.
    :param metadata: extra facts stored in the bundle and ``export.json`` (metrics, data, ...).
    :param program: also write the ``torch.export`` program.
    :returns: the ``model`` section of the result manifest (paths are absolute here).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bundle = {
        "format": FORMAT,
        "class_path": _class_path(model),
        "init_args": model.export_init_args(),
        "state_dict": state_dict,
        "monitor": {"metric": model.monitor, "mode": model.monitor_mode},
        "metadata": metadata or {},
    }
    path = out / STATE_DICT_FILE
    tmp = path.with_name(f".{path.stem}.tmp.pt")
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    info: dict[str, Any] = {
        "path": str(path),
        "format": FORMAT,
        "class_path": bundle["class_path"],
        "init_args": bundle["init_args"],
        "loader": "hpctrain.export.load_model",
        "program_path": None,
        "program_error": None,
    }
    if program and example_input is not None:
        try:
            info["program_path"] = str(_export_program(bundle, example_input, out / PROGRAM_FILE))
        except Exception as exc:  # best effort: model.pt is the reference artifact
            log.warning("torch.export of %s failed: %s", bundle["class_path"], exc)
            info["program_error"] = f"{type(exc).__name__}: {exc}"[:500]
    write_json_atomic(out / "export.json", {**info, "metadata": metadata or {}})
    return info


def _export_program(bundle: dict[str, Any], example_input: torch.Tensor, path: Path) -> Path:
    model = rebuild(bundle["class_path"], bundle["init_args"], bundle["state_dict"])
    example = example_input.detach().cpu()
    if example.shape[0] < 2:
        example = torch.cat([example, example])  # batch 1 would be specialized, not dynamic
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    tmp = path.with_name(f".{path.stem}.tmp.pt2")  # torch.export insists on the suffix
    torch.export.save(program, tmp)
    os.replace(tmp, path)
    return path


def load_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``model.pt`` safely (``weights_only=True``) and check its format.

    :param path: the ``model.pt`` file or the directory holding it.
    """
    p = Path(path)
    if p.is_dir():
        p = p / STATE_DICT_FILE
    bundle = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ValueError(f"{p} is not an {FORMAT} bundle")
    return bundle


def load_model(path: str | os.PathLike[str]) -> TaskModule:
    """Rebuild an exported model in eval mode on CPU.

    :param path: the ``model.pt`` file or the directory holding it.
    """
    bundle = load_bundle(path)
    return rebuild(bundle["class_path"], bundle["init_args"], bundle["state_dict"])
