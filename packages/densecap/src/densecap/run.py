"""The densecap run: image source -> caption sources -> filters -> shards, resumable.

Work is split by *unit* (an input shard or a chunk of the input), and each unit is
written as one output shard ``<split>-<index>.tar`` through :class:`d2s.shards.ShardWriter`
(temporary name, rename, stats JSON last = completion marker). Units are dealt to ranks
round-robin (``unit_number % world_size == rank``) and, inside a rank, to
``num_workers`` processes. A restarted run skips complete shards, so a SIGKILL at any
moment followed by a rerun yields every sample exactly once. A complete shard whose
stats report caption errors is redone from its own samples: good captions are kept,
failed ones are requested again ("fill").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from d2s.config import to_dict
from d2s.schema import Sample
from d2s.shards import ShardWriter, atomic_write_text, completed_shards, iter_samples, shard_name, stats_path

from .captioners import CAPTION_SOURCES, CaptionSource
from .config import DensecapConfig, RunConfig
from .filters import FILTERS, FilterChain
from .images import IMAGE_SOURCES, ImageSource, Rejected, Unit, check_image

log = logging.getLogger(__name__)

REJECTS_DIR = "rejects"


class RunAborted(RuntimeError):
    """A caption source could not go on (e.g. the server died); finished shards are kept."""


def rejects_path(out: Path, split: str, index: int) -> Path:
    return out / REJECTS_DIR / (shard_name(split, index)[: -len(".tar")] + ".rejects.jsonl")


class Worker:
    """Everything one process needs to turn units into shards."""

    def __init__(self, cfg: DensecapConfig, out: Path):
        self.cfg = cfg
        self.out = Path(out)
        self.source: ImageSource = IMAGE_SOURCES.create(cfg.source.type, cfg.source.params, "source.params")
        self.captioners: list[CaptionSource] = []
        for i, c in enumerate(cfg.captioners):
            cls = CAPTION_SOURCES.get(c.type)
            params = CAPTION_SOURCES.parse_params(c.type, c.params, f"captioners[{i}].params")
            self.captioners.append(cls(params, label=c.label or c.type))
        self.chain = FilterChain([FILTERS.create(f.type, f.params, f"filters[{i}].params") for i, f in enumerate(cfg.filters)])
        self.loop = asyncio.new_event_loop()
        self.started = False

    def start(self) -> None:
        if not self.started:
            for c in self.captioners:
                self.loop.run_until_complete(c.start())
            self.started = True

    def close(self) -> None:
        for c in self.captioners:
            try:
                self.loop.run_until_complete(c.close())
            except Exception:  # noqa: BLE001
                log.exception("closing caption source %s", c.label)
        self.loop.close()

    @property
    def fatal(self) -> str:
        return "; ".join(f"{c.label}: {c.fatal}" for c in self.captioners if c.fatal)

    # -------------------------------------------------------------------------------
    def _inputs(self, unit: Unit, refill: bool, rejects: list[dict]):
        """Samples of the unit (from the source, or from our own shard when filling)."""
        if refill:
            yield from list(iter_samples([self.out / shard_name(unit.split, unit.index)]))
            return
        seen: set[str] = set()
        for item in self.source.iter_unit(unit):
            if isinstance(item, Rejected):
                rejects.append({"kind": "image", **asdict(item)})
                continue
            ext, reason = check_image(item.image)
            if ext is None:
                rejects.append({"kind": "image", "key": item.key, "id": item.id, "path": item.path, "reason": reason})
                continue
            if item.key in seen:
                rejects.append({"kind": "image", "key": item.key, "id": item.id, "path": item.path, "reason": "duplicate key in unit"})
                continue
            seen.add(item.key)
            item.image_ext = ext
            if item.split != unit.split:
                item.split = unit.split
            yield item

    def _caption_batch(self, batch: list[Sample], counts: Counter, rejects: list[dict]) -> None:
        for cap in self.captioners:
            todo = []
            for s in batch:
                mine = [d for d in s.dense if d.source == cap.label]
                if mine and not self.cfg.recaption and not any(d.error for d in mine):
                    continue
                s.dense = [d for d in s.dense if d.source != cap.label]
                todo.append(s)
            if not todo:
                continue
            t0 = time.perf_counter()
            results = self.loop.run_until_complete(cap.caption(todo))
            counts["caption_seconds"] += time.perf_counter() - t0
            if len(results) != len(todo):
                raise RuntimeError(f"caption source {cap.label!r} returned {len(results)} results for {len(todo)} samples")
            for s, d in zip(todo, results):
                counts["captions_requested"] += 1
                if d is None:
                    counts["captions_missing"] += 1
                    continue
                verdict = self.chain.apply(d, s)
                s.dense.append(d)
                counts["prompt_tokens"] += int(d.scores.get("prompt_tokens", 0))
                counts["completion_tokens"] += int(d.scores.get("completion_tokens", 0))
                if d.error:
                    counts["caption_errors"] += 1
                    rejects.append({"kind": "caption", "key": s.key, "id": s.id, "source": d.source, "reason": "error", "error": d.error})
                elif verdict == "keep":
                    counts["captions_kept"] += 1
                else:
                    counts["captions_dropped"] += 1
                    counts[f"dropped_{verdict}"] += 1
                    rejects.append({"kind": "caption", "key": s.key, "id": s.id, "source": d.source, "reason": verdict, "text": d.text, "scores": d.scores})

    def process(self, unit: Unit, progress=None) -> dict[str, Any]:
        """Write the unit's shard; returns its stats."""
        self.start()
        out_tar = self.out / shard_name(unit.split, unit.index)
        rp = rejects_path(self.out, unit.split, unit.index)
        refill = out_tar.exists() and stats_path(out_tar).exists()
        rejects: list[dict] = []
        if refill and rp.exists():  # keep the image rejects of the first pass
            rejects = [r for r in map(json.loads, rp.read_text().splitlines()) if r.get("kind") == "image"]
        counts: Counter = Counter()
        retries0 = sum(getattr(c, "retries", 0) for c in self.captioners)
        self.chain.reset()
        t0 = time.perf_counter()
        with ShardWriter(self.out, unit.split, unit.index) as w:
            batch: list[Sample] = []

            def flush() -> None:
                self._caption_batch(batch, counts, rejects)
                for s in batch:
                    w.write(s)
                if progress is not None:
                    progress(len(batch))
                batch.clear()

            for s in self._inputs(unit, refill, rejects):
                batch.append(s)
                if len(batch) >= self.cfg.batch_size:
                    flush()
            if batch:
                flush()
            seconds = time.perf_counter() - t0
            rp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(rp, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
            cap_s = counts.pop("caption_seconds", 0.0)
            w.stats.update({k: int(v) for k, v in counts.items()})
            w.stats.update(
                images_rejected=sum(1 for r in rejects if r["kind"] == "image"),
                caption_errors=int(counts.get("caption_errors", 0)),
                captions_per_s=round(counts.get("captions_requested", 0) / seconds, 3) if seconds else 0.0,
                completion_tokens_per_s=round(counts.get("completion_tokens", 0) / seconds, 1) if seconds else 0.0,
                caption_seconds=round(cap_s, 3),
                filled=refill,
                captioners=[c.label for c in self.captioners],
                max_in_flight={c.label: getattr(c, "max_in_flight", 1) for c in self.captioners},
                retries=sum(getattr(c, "retries", 0) for c in self.captioners) - retries0,
                filters=[f.name for f in self.chain.filters],
                config_hash=config_fingerprint(self.cfg),
            )
            stats = dict(w.stats)
        stats.update(shard=out_tar.name, count=w.count)
        return stats


def config_fingerprint(cfg: DensecapConfig) -> str:
    """Hash of everything that decides a shard's content (not workers, batch size or progress bars)."""
    doc = {k: v for k, v in to_dict(cfg).items() if k not in ("num_workers", "batch_size", "progress")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_units(
    source: ImageSource, out: Path, rank: int, world_size: int, fingerprint: str | None = None
) -> tuple[list[Unit], list[Unit]]:
    """(this rank's units still to do, all of this rank's units).

    A complete shard is redone when it recorded caption errors (to fill them) or when it was
    written under another configuration (``fingerprint``: other sources, prompts or filters).
    """
    units = source.units()
    names = [shard_name(u.split, u.index) for u in units]
    if len(set(names)) != len(names):
        raise ValueError("image source produced two units with the same split and index")
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    done = completed_shards(out)
    todo = []
    for u in mine:
        p = out / shard_name(u.split, u.index)
        st = done.get(str(p))
        stale = st is not None and fingerprint is not None and st.get("config_hash") not in (None, fingerprint)
        if st is not None and not st.get("caption_errors") and not stale:
            continue
        if stale:
            log.warning("%s was written under another configuration: captioning it again", p.name)
        if st is None or stale:  # leftovers of an interrupted write of this unit (never other ranks' units)
            p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            stats_path(p).unlink(missing_ok=True)
        todo.append(u)
    return todo, mine


# ---- multi-process ----------------------------------------------------------------
_WORKER: Worker | None = None


def _init_worker(cfg_dict: dict, out: str) -> None:
    global _WORKER
    from d2s.config import from_dict
    from d2s.log import setup_logging

    setup_logging()
    _WORKER = Worker(from_dict(DensecapConfig, cfg_dict, "config"), Path(out))


def _work(unit: Unit) -> dict:
    assert _WORKER is not None
    stats = _WORKER.process(unit)
    stats["fatal"] = _WORKER.fatal
    return stats


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a densecap job; returns a summary. Raises RunAborted when a source died."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = DensecapConfig(**{k: getattr(cfg, k) for k in DensecapConfig.__dataclass_fields__})
    atomic_write_text(out / f"densecap-config.rank{cfg.rank}.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    worker = Worker(base, out)
    todo, mine = plan_units(worker.source, out, cfg.rank, cfg.world_size, config_fingerprint(base))
    known = [u.size for u in todo]
    total = sum(known) if all(k is not None for k in known) else None
    log.info("densecap: %d unit(s) for rank %d/%d, %d already complete", len(todo), cfg.rank, cfg.world_size, len(mine) - len(todo))
    results: list[dict] = []
    fatal = ""
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"densecap rank {cfg.rank}", unit="img", disable=not cfg.progress, dynamic_ncols=True)

    def tick(n: int) -> None:
        bar.update(n)
        el = time.perf_counter() - t0
        bar.set_postfix_str(f"{sum(r.get('captions_requested', 0) for r in results) / el if el else 0:.1f} cap/s shards {len(results)}/{len(todo)}")

    try:
        if cfg.num_workers == 1 or len(todo) <= 1:
            try:
                for u in todo:
                    results.append(worker.process(u, progress=tick))
                    tick(0)
                    if worker.fatal:
                        fatal = worker.fatal
                        break
            finally:
                worker.close()
        else:
            worker.close()
            import multiprocessing as mp

            with ProcessPoolExecutor(cfg.num_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(to_dict(base), str(out))) as ex:
                futures = [ex.submit(_work, u) for u in todo]
                for f in futures:
                    r = f.result()
                    results.append(r)
                    tick(r["count"])
                    if r.get("fatal") and not fatal:
                        fatal = r["fatal"]
                        for g in futures:
                            g.cancel()
                        break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    agg: Counter = Counter()
    for r in results:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("index", "schema_version", "bytes", "seconds", "captions_per_s", "completion_tokens_per_s"):
                agg[k] += v
    summary = {
        "units_total": len(mine),
        "units_run": len(results),
        "seconds": round(seconds, 2),
        "captions_per_s": round(agg.get("captions_requested", 0) / seconds, 3) if seconds else 0.0,
        **{k: int(v) if float(v).is_integer() else round(v, 3) for k, v in agg.items()},
    }
    complete = completed_shards(out)
    all_done = all(str(out / shard_name(u.split, u.index)) in complete for u in worker.source.units())
    if all_done:
        from d2s.shards import write_manifest

        from .report import write_report

        write_manifest(out)
        write_report(out, Path(cfg.report) if cfg.report else out / "report")
    summary["complete"] = all_done
    log.info("densecap summary: %s", json.dumps(summary))
    if fatal:
        raise RunAborted(f"stopped after {len(results)} shard(s): {fatal}. Finished shards are kept; "
                         "failed captions are recorded with their error; rerun the same command to fill them.")
    return summary
