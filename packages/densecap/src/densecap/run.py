"""The densecap run: image source -> caption sources -> filters -> shards, resumable.

Orchestration only: take the rank lock (:mod:`densecap.locks`), plan the units from the image
source (:func:`densecap.worker.plan_units`), hand them to the executor ``executor.type`` names
(:mod:`densecap.executors`) as a :class:`~densecap.executors.base.WorkerSpec` of densecap's
worker (:class:`densecap.worker.Worker`), show progress, sum the shards' stats and, when every
rank's units are complete, write the manifest and the report.

Work is split by *unit* (an input shard or a chunk of the input), and each unit is written as
one output shard ``<split>-<index>.tar`` through :class:`d2s.shards.ShardWriter` (temporary
name, rename, stats JSON last = completion marker). Units are dealt to ranks round-robin
(``unit_number % world_size == rank``) and, inside a rank, to the executor's workers. A
restarted run skips complete shards, so a SIGKILL at any moment followed by a rerun yields
every sample exactly once. A complete shard whose stats report caption errors is redone from
its own samples: good captions are kept, failed ones are requested again ("fill"), and every
caption of the shard goes through the filters again in shard order, exactly as in a first pass.
An interrupt (SIGINT, or SIGTERM under :func:`d2s.processes.signals_interrupt`) becomes
:class:`RunInterrupted`, saying how many shards are finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from d2s.atomic import atomic_write_text
from d2s.config import to_dict
from d2s.shards import completed_shards, shard_name

from .config import DensecapConfig, RunConfig
from .executors.base import EXECUTORS, WorkerSpec
from .images import IMAGE_SOURCES, Unit
from .locks import RunLock
from .worker import RunAborted, config_fingerprint, grounding_fingerprint, plan_units, resolve_image_exts

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; finished shards are kept. ``signum`` says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a densecap job; returns a summary. Raises RunAborted when a source died,
    RunLocked when another process is writing the same rank of ``cfg.out``, RunInterrupted on
    SIGINT (and on SIGTERM when the caller turned it into an interrupt)."""
    if cfg.grounding is not None:
        cfg.grounding.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, cfg.rank):
        return _run_locked(cfg, out)


def worker_spec(cfg: DensecapConfig, out: Path, image_exts: dict[str, str | None]) -> WorkerSpec:
    """densecap's captioning job as a :class:`WorkerSpec` (plain data: it travels to worker processes)."""
    job = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(DensecapConfig)}
    return WorkerSpec(
        factory="densecap.worker:make_worker",
        config={"config": job, "image_exts": image_exts},
        out=str(out),
        fingerprint=config_fingerprint(cfg),
        check="densecap.worker:check_servers",
        expect={"grounding_hash": grounding_fingerprint(cfg)},
    )


def _run_locked(cfg: RunConfig, out: Path) -> dict[str, Any]:
    atomic_write_text(out / f"densecap-config.rank{cfg.rank}.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    source = IMAGE_SOURCES.create(cfg.source.type, cfg.source.params, "source.params")
    units = source.units()
    on_ray = cfg.executor.type == "ray"
    expect = {"grounding_hash": grounding_fingerprint(cfg)}
    todo, mine = plan_units(
        units, out, cfg.rank, cfg.world_size, config_fingerprint(cfg), clean=not on_ray, expect=expect
    )
    image_exts = resolve_image_exts(source, units, cfg.image_ext) if todo else {}
    log.info(
        "densecap: %d unit(s) for rank %d/%d, %d already complete",
        len(todo),
        cfg.rank,
        cfg.world_size,
        len(mine) - len(todo),
    )
    results: list[dict] = []
    info: dict[str, Any] = {}
    run_units = EXECUTORS.get(cfg.executor.type)
    t0 = time.perf_counter()
    try:
        with _progress(cfg, todo, results, t0) as tick:
            fatal = run_units(
                worker_spec(cfg, out, image_exts), todo, cfg.executor, cfg.num_workers, results, tick, info
            )
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, out, mine, cfg) from None
    summary = _summary(cfg, mine, results, info, time.perf_counter() - t0)
    summary["complete"] = _finish_if_complete(cfg, out, units)
    log.info("densecap summary: %s", json.dumps(summary))
    if fatal:
        raise RunAborted(
            f"stopped after {len(results)} shard(s): {fatal}. Finished shards are kept; "
            "failed captions are recorded with their error; rerun the same command to fill them."
        )
    return summary


def _interrupted(exc: KeyboardInterrupt, out: Path, mine: list[Unit], cfg: RunConfig) -> RunInterrupted:
    signum = getattr(exc, "signum", signal.SIGINT)
    complete = completed_shards(out)
    done = sum(1 for u in mine if str(out / shard_name(u.split, u.index)) in complete)
    rank = f" of rank {cfg.rank}/{cfg.world_size}" if cfg.world_size > 1 else ""
    return RunInterrupted(
        f"densecap: interrupted ({signal.Signals(signum).name}): {done} of {len(mine)} shard(s){rank} finished "
        f"in {out}; rerun the same command to continue",
        signum,
    )


@contextlib.contextmanager
def _progress(cfg: RunConfig, todo: list[Unit], results: list[dict], t0: float):
    """A progress bar over this rank's images; yields ``tick(n)`` (n images more done)."""
    from tqdm import tqdm

    known = [u.size for u in todo]
    total = sum(known) if all(k is not None for k in known) else None
    bar = tqdm(total=total, desc=f"densecap rank {cfg.rank}", unit="img", disable=not cfg.progress, dynamic_ncols=True)

    def tick(n: int) -> None:
        bar.update(n)
        el = time.perf_counter() - t0
        rate = sum(r.get("captions_requested", 0) for r in results) / el if el else 0
        bar.set_postfix_str(f"{rate:.1f} cap/s shards {len(results)}/{len(todo)}")

    try:
        yield tick
    finally:
        bar.close()


# per-shard stats that are not summed into the run summary
_NOT_SUMMED = ("index", "schema_version", "bytes", "seconds", "captions_per_s", "completion_tokens_per_s")


def _summary(cfg: RunConfig, mine: list[Unit], results: list[dict], info: dict, seconds: float) -> dict[str, Any]:
    agg: Counter = Counter()
    for r in results:
        if r.get("skipped"):  # completed by an earlier attempt while this run waited for its lock
            continue
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_SUMMED:
                agg[k] += v
    on_ray = cfg.executor.type == "ray"
    return {
        "units_total": len(mine),
        "units_run": len(results),
        "executor": cfg.executor.type,
        **({"units_skipped": sum(1 for r in results if r.get("skipped")), **info} if on_ray else {}),
        "seconds": round(seconds, 2),
        "captions_per_s": round(agg.get("captions_requested", 0) / seconds, 3) if seconds else 0.0,
        **{k: int(v) if float(v).is_integer() else round(v, 3) for k, v in agg.items()},
    }


def _finish_if_complete(cfg: RunConfig, out: Path, units: list[Unit]) -> bool:
    """When every unit of every rank is complete, write the manifest and the report."""
    complete = completed_shards(out)
    all_done = all(str(out / shard_name(u.split, u.index)) in complete for u in units)
    if all_done:
        from d2s.shards import write_manifest

        from .card import refresh_card
        from .report import write_report

        write_manifest(out)
        write_report(out, Path(cfg.report) if cfg.report else out / "report")
        refresh_card(out)  # a corpus with a data card keeps it current
    return all_done
