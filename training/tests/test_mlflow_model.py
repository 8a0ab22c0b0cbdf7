"""The job's model folder is an MLflow Model: MLflow's own loaders read it, no server involved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hpctrain_testing import DEEPCAM_TINY, SURROGATE_TINY

from hpctrain.export import load_model
from hpctrain.manifest import load_manifest

mlflow = pytest.importorskip("mlflow")


def test_surrogate_model_folder_loads_as_pyfunc_on_named_columns(hpctrain, borehole_csv, tmp_path):
    job = tmp_path / "job"
    assert hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert m["model"]["mlflow_model"] == "MLmodel" and (job / "model" / "MLmodel").is_file()
    # the hpctrain.model/v1 export stays next to it, for users without MLflow
    assert (job / "model" / "model.pt").is_file() and (job / "model" / "export.json").is_file()

    pyfunc = mlflow.pyfunc.load_model(str(job / "model"))
    features = m["hyperparameters"]["data"]["init_args"]["features"]
    assert pyfunc.metadata.get_input_schema().input_names() == features
    frame = pd.read_csv(borehole_csv)[features].head(5)
    # columns in another order are matched by name, not position
    predicted = pyfunc.predict(frame[list(reversed(features))])
    reference = load_model(job / "model")(torch.tensor(frame.to_numpy(np.float32))).detach().numpy()
    assert np.allclose(np.asarray(predicted).reshape(reference.shape), reference, atol=1e-5)

    # a column missing is refused with MLflow's schema error, not a shape error inside torch
    with pytest.raises(mlflow.exceptions.MlflowException, match=features[0]):
        pyfunc.predict(frame.drop(columns=[features[0]]))

    native = mlflow.pytorch.load_model(str(job / "model"))
    assert torch.allclose(native(torch.tensor(frame.to_numpy(np.float32))), torch.tensor(reference), atol=1e-5)


def test_deepcam_model_folder_loads_as_pyfunc_on_arrays(hpctrain, tmp_path):
    job = tmp_path / "deepcam"
    assert hpctrain("fit", *DEEPCAM_TINY, f"--run.job_dir={job}") == 0
    pyfunc = mlflow.pyfunc.load_model(str(job / "model"))
    x = np.random.default_rng(0).normal(size=(3, 4, 32, 32)).astype(np.float32)
    logits = pyfunc.predict(x)
    assert logits.shape == (3, 3, 32, 32)
    assert np.allclose(logits, load_model(job / "model")(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
