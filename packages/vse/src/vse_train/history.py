"""What a run reports: ``metrics.jsonl`` (:class:`History`), the mean losses between records
(:class:`LossMeter`), and the run's config as tracker hyper-parameters (:func:`flat_scalars`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2s.atomic import atomic_write_text


class History:
    """``metrics.jsonl`` in the run dir: one line per log step and per validation.

    On resume, lines past the restored step are dropped first, so the file always
    describes exactly one run from step 0 (what the report's training curves plot).
    """

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


@dataclass
class LossMeter:
    """Sums of this process's loss terms since the last record, and the first and last means."""

    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0  # micro-batches summed
    first: float | None = None
    last: float | None = None

    def add(self, parts: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """One micro-batch's terms and total."""
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.sums["total"] = self.sums.get("total", 0.0) + float(total.detach())
        self.n += 1

    def means(self) -> dict[str, float]:
        """``loss/<term>`` (and ``loss/total``): the means since the last call, which start again."""
        out = {f"loss/{k}": v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        self.last = out["loss/total"]
        if self.first is None:
            self.first = self.last
        return out


def flat_scalars(doc: dict, prefix: str = "") -> dict[str, Any]:
    """A nested JSON document as ``a/b/c`` -> scalar (lists and other values as JSON text)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = json.dumps(v)
    return out
