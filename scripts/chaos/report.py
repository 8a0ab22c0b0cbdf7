"""Figures from the trials: one row per (fault, phase), rendered into docs/RELIABILITY.md.

Pure: trials in (the records ``bench/results/chaos.json`` holds), Markdown out. The document's
generated part sits between two markers; everything outside them is written by hand and kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scripts.chaos.table import FAULTS, NOT_COVERED, PHASES

HARNESS_ERROR = "harness-error"
BEGIN = "<!-- chaos:generated:begin (python -m scripts.chaos --render; do not edit by hand) -->"
END = "<!-- chaos:generated:end -->"


@dataclass(frozen=True)
class Row:
    """The figures of one (fault, phase) pair."""

    fault: str
    phase: str
    trials: int
    successes: int
    duplicates: int
    orphans: int
    orphans_unchecked: int
    lost: int
    duplicated_lines: int
    secrets: int
    phase_hit: int
    recovery: tuple[float, ...]

    @property
    def p50(self) -> float | None:
        return statistics.median(self.recovery) if self.recovery else None

    @property
    def max(self) -> float | None:
        return max(self.recovery) if self.recovery else None


def _order(pair: tuple[str, str]) -> tuple[int, int, str, str]:
    fault, phase = pair
    faults, phases = list(FAULTS), list(PHASES)
    return (faults.index(fault) if fault in faults else len(faults),
            phases.index(phase) if phase in phases else len(phases), fault, phase)


def summarise(trials: Iterable[Mapping[str, Any]]) -> list[Row]:
    """One :class:`Row` per (fault, phase) that has trials, in the fault table's order.
    Trials the harness itself failed (``harness-error``) measured nothing and are left out."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for t in trials:
        if t.get("outcome") == HARNESS_ERROR:
            continue
        groups.setdefault((t["fault"], t["phase"]), []).append(t)
    rows = []
    for (fault, phase), ts in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        rows.append(Row(
            fault=fault, phase=phase, trials=len(ts),
            successes=sum(t.get("outcome") == "success" for t in ts),
            duplicates=sum(int(t.get("duplicates") or 0) for t in ts),
            orphans=sum(len(t["orphans"]) for t in ts if t.get("orphans") is not None),
            orphans_unchecked=sum(t.get("orphans") is None for t in ts),
            lost=sum(bool(t.get("lost")) for t in ts),
            duplicated_lines=sum(int((t.get("lines") or {}).get("duplicated") or 0) for t in ts),
            secrets=sum(len(t.get("secrets_found") or []) for t in ts),
            phase_hit=sum(bool(t.get("phase_hit")) for t in ts),
            recovery=tuple(float(t["recovery_s"]) for t in ts if t.get("recovery_s") is not None),
        ))
    return rows


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def render_table(rows: Sequence[Row]) -> str:
    """The Markdown table: fault x phase with trials, successes, duplicates, orphans, lost,
    duplicated lines, secrets, how many injections landed in the phase, p50/max recovery."""
    out = ["| fault | phase | trials | successes | duplicate jobs | orphans | lost | duplicated lines "
           "| secrets in logs | in phase | recovery p50 / max (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        orphans = f"{r.orphans} ({r.orphans_unchecked} unchecked)" if r.orphans_unchecked else str(r.orphans)
        out.append(f"| {r.fault} | {r.phase} | {r.trials} | {r.successes} | {r.duplicates} | {orphans} | {r.lost} "
                   f"| {r.duplicated_lines} | {r.secrets} | {r.phase_hit} | {_seconds(r.p50)} / {_seconds(r.max)} |")
    return "\n".join(out)


def render_generated(results: Mapping[str, Any]) -> str:
    """The generated part of docs/RELIABILITY.md: the table, the promises, what is not covered."""
    trials = [t for t in results.get("trials", []) if t.get("outcome") != HARNESS_ERROR]
    errors = len(results.get("trials", [])) - len(trials)
    rows = summarise(trials)
    when = sorted(t["started_at"] for t in trials if t.get("started_at"))
    span = f"{when[0]} to {when[-1]}" if when else "none run yet"
    left_out = f"; {errors} trial(s) the harness itself failed are left out" if errors else ""
    lines = [BEGIN, "", f"{len(trials)} trials, {span} (`bench/results/chaos.json`{left_out}).", "",
             render_table(rows), "",
             "### Promises", "",
             "What a user can rely on for each fault; the table above is the evidence.", ""]
    for fault in FAULTS.values():
        lines.append(f"- **{fault.name}** (at {', '.join(fault.phases)}): {fault.promise}")
    lines += ["", "### Phases", ""]
    for phase in PHASES.values():
        window = f"{phase.delay[0]:g}-{phase.delay[1]:g} s after `{phase.task_id}` is {' / '.join(phase.states)}"
        lines.append(f"- **{phase.name}**: {phase.what}; faults land {window}.")
    lines += ["", "### Not covered yet", "", "Faults and figures of issue 11 this suite does not measure yet:", ""]
    lines += [f"- {item}" for item in NOT_COVERED]
    lines += ["", END]
    return "\n".join(lines)


def update_doc(text: str, generated: str) -> str:
    """``text`` with its generated part replaced (appended when the markers are missing)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + generated + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + generated + "\n"
