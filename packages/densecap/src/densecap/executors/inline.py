"""``inline``: the units one after the other in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..images import Unit
from .base import WorkerSpec, build_worker


def run_units(
    spec: WorkerSpec,
    todo: list[Unit],
    executor: Any,
    num_workers: int,
    results: list[dict],
    tick: Callable[[int], None],
    info: dict[str, Any],
) -> str:
    """Write ``todo`` here, in order; stops after the unit whose worker turned fatal."""
    if not todo:
        return ""
    worker = build_worker(spec)
    try:
        for u in todo:
            r = worker.process(u, progress=tick)
            r["fatal"] = worker.fatal
            results.append(r)
            tick(0)
            if worker.fatal:
                return worker.fatal
        return ""
    finally:
        worker.close()
