"""``pool``: the units in ``num_workers`` spawned processes that die with this one."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from d2s.processes import die_with_parent, signals_deferred

from ..images import Unit
from .base import UnitWorker, WorkerSpec, build_worker

_WORKER: UnitWorker | None = None


def _init_worker(spec: WorkerSpec, parent_pid: int) -> None:
    global _WORKER
    die_with_parent(parent_pid)
    from d2s.log import setup_logging

    setup_logging()
    _WORKER = build_worker(spec)


def _work(unit: Unit) -> dict:
    assert _WORKER is not None
    stats = _WORKER.process(unit)
    stats["fatal"] = _WORKER.fatal
    return stats


def run_units(
    spec: WorkerSpec,
    todo: list[Unit],
    executor: Any,
    num_workers: int,
    results: list[dict],
    tick: Callable[[int], None],
    info: dict[str, Any],
) -> str:
    """Write ``todo`` in ``num_workers`` processes; after a fatal result, starts no new unit.
    Interrupted (SIGINT, SIGTERM), it ends its workers at once: a rerun redoes their units."""
    if not todo:
        return ""
    ex = ProcessPoolExecutor(
        num_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(spec, os.getpid())
    )
    try:
        futures = [ex.submit(_work, u) for u in todo]
        for f in futures:
            r = f.result()
            results.append(r)
            tick(r["count"])
            if r.get("fatal"):
                for g in futures:
                    g.cancel()
                return r["fatal"]
        return ""
    except KeyboardInterrupt:  # SIGINT, or SIGTERM under d2s.processes.signals_interrupt
        with signals_deferred():
            for p in mp.active_children():
                p.kill()
            ex.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        ex.shutdown(wait=True)
