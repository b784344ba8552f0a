"""Evaluation records and their renderings (JSON, console table)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class EvalRecord:
    """One measured number: what was measured, where in the run, and how long it took."""

    position: str
    evaluator: str
    dataset: str
    metric: str
    value: float
    seconds: float
    stderr: float | None = None  # standard error of ``value`` where the evaluator gives one (lm-eval)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["stderr"] is None:  # records without one keep the shape results.json always had
            del out["stderr"]
        return out

    def shown_value(self) -> str:
        """``value`` for tables: ``0.5400 ± 0.0500`` when there is a stderr."""
        return f"{self.value:.4f}" if self.stderr is None else f"{self.value:.4f} ± {self.stderr:.4f}"


def render_table(records: list[EvalRecord]) -> str:
    """A plain-text table, one row per record."""
    header = ("position", "evaluator", "dataset", "metric", "value", "seconds")
    rows = [header] + [(r.position, r.evaluator, r.dataset, r.metric, r.shown_value(), f"{r.seconds:.1f}") for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, records: list[EvalRecord], extra: dict | None = None) -> None:
    """Write ``results.json`` atomically (:func:`llmc_core.fsutil.atomic_file`)."""
    from llmc_core.fsutil import atomic_file

    payload = {"results": [r.to_dict() for r in records], **(extra or {})}
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
