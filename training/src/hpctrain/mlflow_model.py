"""The exported model as an MLflow Model (the ``pytorch`` flavour, loadable as ``pyfunc``).

Written into the job's ``model/`` folder next to the ``hpctrain.model/v1`` files, *without* a
tracking server: :func:`mlflow.pytorch.save_model` works on the local filesystem, so compute
nodes without network produce the same artifact as online ones, and Airflow only uploads the
folder. The registered version's source is that folder, so ``mlflow.pyfunc.load_model(
"models:/<name>@champion")`` and ``mlflow models serve`` work on it.

* signature + input example: a DataFrame of the feature columns for tabular tasks (surrogate),
  a float32 tensor spec with a dynamic batch for arrays (deepcam);
* the pickle serialisation (column-based signatures are not possible with ``pt2``), with the
  ``hpctrain`` sources as ``code_paths`` so the model loads where hpctrain is not installed;
* pinned pip requirements, so MLflow does not start a subprocess to infer them (slow, and it
  imports the model in a fresh interpreter on the compute node).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import hpctrain

#: the name of the MLflow Model's own file; its presence marks a folder as an MLflow Model
MLMODEL_FILE = "MLmodel"
_REQUIREMENTS = ("torch", "lightning", "torchmetrics", "numpy", "pandas")


def _requirements() -> list[str]:
    pins = []
    for dist in _REQUIREMENTS:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        # "+cpu" local versions are not on PyPI; the public release is what a user installs.
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins


def input_example(example: torch.Tensor, feature_names: Sequence[str] | None = None) -> Any:
    """The input example MLflow stores: a DataFrame with named columns for tabular inputs,
    else a float32 numpy array (the batch dimension stays dynamic in the signature)."""
    array = example.detach().cpu().float().numpy()
    if feature_names and array.ndim == 2 and array.shape[1] == len(feature_names):
        import pandas as pd

        # float64 columns: what pandas reads from CSV/Parquet and Mongo; MLflow refuses to
        # narrow them to a float32 schema, and the pytorch flavour casts to float32 itself.
        return pd.DataFrame(array.astype("float64"), columns=list(feature_names))
    return array


def signature(sample: Any, prediction: Any) -> Any:
    """The model's signature, spelled out: named double columns (or a float32 tensor with a
    dynamic batch) in, a float32 tensor out.

    Not :func:`mlflow.models.infer_signature`: with ``mlflow-skinny`` (the image's MLflow) it
    needs scipy, and without it silently degrades to an untyped ``Any`` schema.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    def tensor(array: Any) -> TensorSpec:
        return TensorSpec(np.dtype("float32"), (-1, *array.shape[1:]))

    if hasattr(sample, "columns"):
        inputs = Schema([ColSpec("double", str(name)) for name in sample.columns])
    else:
        inputs = Schema([tensor(sample)])
    return ModelSignature(inputs=inputs, outputs=Schema([tensor(prediction)]))


def save(model: torch.nn.Module, out_dir: str | os.PathLike[str], example: torch.Tensor,
         feature_names: Sequence[str] | None = None, metadata_: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an MLflow Model into ``out_dir`` (replacing an earlier one there).

    :param model: the trained network in eval mode, taking raw inputs.
    :param out_dir: the folder; files other than the MLflow Model's own are kept.
    :param example: a batch of inputs (at least one row).
    :param feature_names: input column names of a tabular task: the signature is column-based.
    :param metadata_: extra facts stored in ``MLmodel`` (format, task, data identity).
    :return: the folder.
    """
    import mlflow.pytorch

    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.mlflow-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    sample = input_example(example, feature_names)
    with torch.no_grad():
        prediction = model(torch.as_tensor(example, dtype=torch.float32)).cpu().numpy()
    mlflow.pytorch.save_model(
        model,
        str(staging),
        signature=signature(sample, prediction),
        input_example=sample,
        code_paths=[str(Path(hpctrain.__file__).parent)],
        pip_requirements=_requirements(),
        metadata=metadata_,
        serialization_format="pickle",  # MLflow 3 defaults to pt2 on torch >= 2.4 (tensor specs only)
    )
    # save_model insists on a fresh folder; model.pt/model.pt2/export.json live in `out` too.
    out.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    return out
