"""``hpctrain evaluate``: metrics of an exported model on a held-out data set.

The nightly retrain compares the challenger (tonight's model) with the champion (the registered
production model) on the same held-out data: call :func:`evaluate` for both with the same data
spec and compare ``metrics[monitor.metric]`` in the direction ``monitor.mode``.

A data spec is the ``data:`` section of a training config (``class_path`` + ``init_args``),
either alone or inside a full config. ``split: all`` (default) evaluates every row/sample of the
spec's source, which is what a held-out file, query or seed is for; ``val`` reproduces the
validation split of a training config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hpctrain.errors import EXIT_CONFIG_ERROR, ConfigError


def load_data_spec(spec: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Read a data spec from YAML/JSON (path) or accept a dict; unwrap a full config's ``data``.

    :param spec: path of a YAML/JSON file, or the spec itself.
    """
    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"data spec not found: {path}")
        spec = yaml.safe_load(path.read_text())
    if isinstance(spec, dict) and "data" in spec and "class_path" not in spec:
        spec = spec["data"]
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError("a data spec needs class_path (and init_args), e.g. the data: section of a config")
    return spec


def instantiate_datamodule(spec: dict[str, Any]) -> Any:
    """Build the data module of a spec with the same parser (and checks) as ``hpctrain fit``."""
    from jsonargparse import ArgumentParser

    from hpctrain.data.base import HpcDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(HpcDataModule, "data", required=True)
    try:
        config = parser.parse_object({"data": spec})
    except Exception as exc:  # jsonargparse reports unknown keys / wrong types here
        raise ConfigError(f"invalid data spec: {exc}") from exc
    return parser.instantiate_classes(config).data


def evaluate(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str] | dict[str, Any],
    split: str = "all",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate an exported model on a data spec.

    :param model_path: ``model.pt`` (or its directory) written by ``hpctrain fit``.
    :param data: the data spec (see module docstring), as a path or dict.
    :param split: ``all``, ``val`` or ``train``.
    :param batch_size: evaluation batch size (default: the spec's).
    :returns: ``{"metrics": {"val/loss": ...}, "monitor": {"metric", "mode"}, "data": identity,
        "model": path, "split": split, "samples": n}``.
    """
    from hpctrain.export import load_bundle, rebuild

    bundle = load_bundle(model_path)
    model = rebuild(bundle["class_path"], bundle["init_args"], bundle["state_dict"])
    datamodule = instantiate_datamodule(load_data_spec(data))
    if batch_size:
        datamodule.eval_batch_size = batch_size
    with tempfile.TemporaryDirectory(prefix="hpctrain-eval-") as tmp:
        if not datamodule.cache_dir_configured:
            datamodule.use_cache_dir(tmp)  # never reuse a stale snapshot for a comparison
        datamodule.check()
        datamodule.prepare_data()
        datamodule.setup("validate")
        for key, value in datamodule.model_dims().items():
            expected = bundle["init_args"].get(key)
            if isinstance(value, int) and expected is not None and int(expected) != value:
                raise ConfigError(f"model expects {key}={expected}, data provides {value}")
        loader = datamodule.eval_dataloader(split)  # type: ignore[arg-type]
        metrics = model.evaluate(loader)
        identity = datamodule.data_identity()
    return {
        "metrics": metrics,
        "monitor": bundle.get("monitor"),
        "data": json.loads(json.dumps(identity, default=str)),
        "model": str(model_path),
        "split": split,
        "samples": len(loader.dataset),  # type: ignore[arg-type]
    }


def main(argv: list[str] | None = None) -> int:
    """``hpctrain evaluate --model PATH --data SPEC [--split all] [--output FILE]``."""
    parser = argparse.ArgumentParser(prog="hpctrain evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model.pt (or its directory)")
    parser.add_argument("--data", required=True, help="YAML/JSON data spec or training config")
    parser.add_argument("--split", default="all", choices=("all", "val", "train"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the result JSON here")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model, args.data, args.split, args.batch_size)
    except ConfigError as exc:
        print(f"hpctrain evaluate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output:
        from hpctrain.job import write_json_atomic

        write_json_atomic(args.output, result)
    print(text)
    return 0
