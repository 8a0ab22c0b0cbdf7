"""Champion / challenger: evaluate both on the same held-out data, promote only a clear winner.

The decision is a pure function (:func:`decide`) so the rule is testable and written once; the
evaluation itself is ``hpctrain.evaluate`` on the two registered models' artifacts.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Decision:
    """Whether the challenger replaces the champion, and why."""

    promote: bool
    reason: str
    metric: str
    challenger: float | None
    champion: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(metric: str, mode: str, challenger: float, champion: float | None, margin: float) -> Decision:
    """Promote when there is no champion, or the challenger is better by more than ``margin``.

    :param metric: the monitored metric, e.g. ``val/loss``.
    :param mode: ``min`` (lower is better) or ``max``.
    :param challenger: the challenger's value on the held-out data.
    :param champion: the champion's value on the same data, or None when there is no champion.
    :param margin: required relative improvement, e.g. 0.02 for 2 %.
    """
    if champion is None:
        return Decision(True, "no champion yet", metric, challenger, None)
    gain = (champion - challenger) if mode == "min" else (challenger - champion)
    needed = abs(champion) * margin
    if gain > needed:
        return Decision(True, f"{metric} improves by {gain:.4g} (> {needed:.4g} required)", metric, challenger, champion)
    return Decision(False, f"{metric} {challenger:.4g} vs champion {champion:.4g}: improvement {gain:.4g} "
                           f"is not more than the required {needed:.4g} (margin {margin:.1%})",
                    metric, challenger, champion)


def evaluate_version(client: Any, name: str, version: str, data_spec: dict[str, Any]) -> dict[str, Any]:
    """Download a model version's artifacts and evaluate them on ``data_spec`` (hpctrain.evaluate)."""
    from hpctrain.evaluate import evaluate

    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory(prefix="slurmflow-eval-") as tmp:
        local = client.download_artifacts(mv.run_id, "model", tmp)
        return evaluate(Path(local), data_spec)
