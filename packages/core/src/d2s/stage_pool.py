"""``d2s run --jobs N``: a pipeline's stages, up to N at once, each in a process of its own.

A stage starts as soon as every stage it depends on (:meth:`d2s.pipeline.Runner.depends_on`)
has finished; among the stages that could start, the one written first in the pipeline goes
first, to the first free slot. The first slot runs at normal CPU priority and the others at
``nice`` +10, so that a pipeline that lists its longest chain first (the quickstart: stage 1, then
D2S) gets that chain through at nearly its own speed while the side arms use the cores it leaves
idle. The runner's process does the bookkeeping (markers, cache keys, the log); a stage's
``run`` goes to one of N long-lived spawned processes (slots), so a stage never shares a
process with another stage that runs at the same time: torch's thread count, random
generators and working state stay the stage's own, and its numbers are those of a
sequential run.

When a stage fails, no new stage starts; the ones running finish and are marked done, then the
first failure is raised. SIGINT or SIGTERM ends the stage processes at once (their markers stay
"running": a rerun resumes them, as after any interruption). Each slot's processes end with the
runner however it ends (:func:`d2s.processes.die_with_parent`).

In a stage process, log lines start with ``[stage]`` and progress bars take the slot's line
(``TQDM_POSITION``), so that two bars do not overwrite each other on a terminal.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .processes import die_with_parent, signals_deferred, signals_interrupt

log = logging.getLogger(__name__)


class StageProcessDied(RuntimeError):
    """A stage's process ended without returning (a signal, the kernel's out-of-memory killer)."""


BACKGROUND_NICE = 10
"""How much lower the CPU priority of every slot but the first is (``os.nice``)."""


def _init_slot(
    slot: int, parent_pid: int, start_method: str, level: int, log_file: str | None, modules: list[str]
) -> None:
    os.environ["TQDM_POSITION"] = str(slot)  # read by tqdm when first imported (in this process)
    die_with_parent(parent_pid)
    # A spawned process's default start method is "spawn": a stage's own processes (a DataLoader's
    # workers, densecap's pool) start as they would in the runner's process instead.
    mp.set_start_method(start_method, force=True)
    if slot > 0:
        os.nice(BACKGROUND_NICE)
    from .log import setup_logging

    setup_logging(level, log_file)
    for m in modules:  # the stage types' modules, imported while the slot waits for its first stage
        importlib.import_module(m)


def _ready() -> None:
    pass


def _run_in_slot(body: Callable[[Any, Path], tuple[dict, float]], s: Any, run_dir: Path) -> tuple[dict, float]:
    from .log import tag_stage

    tag_stage(s.name)
    try:
        return body(s, run_dir)
    finally:
        tag_stage(None)


def _log_target() -> tuple[int, str | None]:
    """The root logger's level and the file the runner logs to, for the stage processes."""
    root = logging.getLogger()
    files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler) and getattr(h, "_d2s", False)]
    return root.level, (files[-1] if files else None)


def run_at_once(
    todo: list[tuple[Any, dict]],
    jobs: int,
    *,
    run_dir: Path,
    depends_on: Callable[[Any], set[str]],
    begin: Callable[[Any], None],
    body: Callable[[Any, Path], tuple[dict, float]],
    finish: Callable[[Any, dict, dict, float], Any],
) -> None:
    """Run ``todo`` (planned stage, report entry), in pipeline order, up to ``jobs`` at once: the
    runner's ``begin`` (marker) and ``finish`` (outputs check, marker) here, ``body(stage,
    run_dir)`` (the stage's ``run`` and its seconds, a module-level function) in a slot's process."""
    pending = list(todo)
    order = {s.name: i for i, (s, _) in enumerate(todo)}
    # only earlier stages (a literal input path inside a later stage's output is taken as it is)
    deps = {s.name: {d for d in depends_on(s) if order.get(d, i) < i} for i, (s, _) in enumerate(todo)}
    done: set[str] = set()
    level, log_file = _log_target()
    ctx = mp.get_context("spawn")
    modules = sorted({s.cls.__module__ for s, _ in todo})
    slots = [
        ProcessPoolExecutor(
            1,
            mp_context=ctx,
            initializer=_init_slot,
            initargs=(i, os.getpid(), mp.get_start_method(), level, log_file, modules),
        )
        for i in range(min(jobs, len(todo)))
    ]
    for ex in slots:
        ex.submit(_ready)  # every slot's process starts now, not when its first stage is ready
    free = list(range(len(slots)))
    running: dict[Future, tuple[Any, dict, int]] = {}
    failure: BaseException | None = None
    try:
        with signals_interrupt():
            while pending or running:
                if failure is None:
                    for s, entry in [t for t in pending if deps[t[0].name] <= done]:
                        if not free:
                            break
                        pending.remove((s, entry))
                        slot = free.pop(0)
                        begin(s)
                        running[slots[slot].submit(_run_in_slot, body, s, run_dir)] = (s, entry, slot)
                if not running:
                    break  # after a failure: what is pending never starts
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    s, entry, slot = running.pop(fut)
                    free = sorted([*free, slot])
                    try:
                        summary, seconds = fut.result()
                        finish(s, entry, summary, seconds)
                        done.add(s.name)
                    except Exception as exc:  # noqa: BLE001 - raised below, after the running stages
                        if isinstance(exc, BrokenProcessPool):
                            exc = StageProcessDied(
                                f"stage {s.name!r}: its process ended without finishing (killed? out of memory?); "
                                "a rerun resumes the stage"
                            )
                        log.error("stage %s failed: %s: %s", s.name, type(exc).__name__, exc)
                        failure = failure or exc
                if failure is not None and running:
                    log.info(
                        "waiting for the stages still running: %s", ", ".join(s.name for s, _, _ in running.values())
                    )
    except KeyboardInterrupt:
        with signals_deferred():
            if running:
                log.warning(
                    "interrupted: ended stage(s) %s; a rerun resumes them",
                    ", ".join(s.name for s, _, _ in running.values()),
                )
            for p in mp.active_children():
                p.kill()
            for ex in slots:
                ex.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        for ex in slots:
            ex.shutdown(wait=True)
    if failure is not None:
        raise failure
