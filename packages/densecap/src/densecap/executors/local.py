"""``local`` (the default): ``inline`` for one worker or one unit, else ``pool``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..images import Unit
from . import inline, pool
from .base import WorkerSpec


def run_units(
    spec: WorkerSpec,
    todo: list[Unit],
    executor: Any,
    num_workers: int,
    results: list[dict],
    tick: Callable[[int], None],
    info: dict[str, Any],
) -> str:
    """This process alone when ``num_workers`` is 1 or one unit is left, else a process pool."""
    chosen = inline if num_workers == 1 or len(todo) <= 1 else pool
    return chosen.run_units(spec, todo, executor, num_workers, results, tick, info)
