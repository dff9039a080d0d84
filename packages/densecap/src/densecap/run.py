"""The densecap run: image source -> caption sources -> filters -> shards, resumable.

Work is split by *unit* (an input shard or a chunk of the input), and each unit is
written as one output shard ``<split>-<index>.tar`` through :class:`d2s.shards.ShardWriter`
(temporary name, rename, stats JSON last = completion marker). Units are dealt to ranks
round-robin (``unit_number % world_size == rank``) and, inside a rank, to
``num_workers`` processes. A restarted run skips complete shards, so a SIGKILL at any
moment followed by a rerun yields every sample exactly once. A complete shard whose
stats report caption errors is redone from its own samples: good captions are kept,
failed ones are requested again ("fill"), and every caption of the shard goes through the
filters again in shard order, exactly as in a first pass.

Only what decides a caption's content makes a complete shard stale (:func:`content_config`:
source, caption sources without their ``transport_params``, filters, image format): moving
the server or changing concurrency, timeouts or retries keeps every finished caption.
One process at a time writes a rank of an output directory (:class:`RunLock`), and worker
processes die with the process that started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from d2s.atomic import atomic_write_text
from d2s.config import ConfigError, to_dict
from d2s.schema import Sample
from d2s.shards import ShardWriter, completed_shards, iter_samples, shard_name, stats_path

from .caption_sources import CAPTION_SOURCES, CaptionSource
from .config import DensecapConfig, RunConfig, StageConfig
from .filters import FILTERS, FilterChain
from .images import IMAGE_SOURCES, ImageSource, Rejected, Unit, check_image

log = logging.getLogger(__name__)

REJECTS_DIR = "rejects"


class RunAborted(RuntimeError):
    """A caption source could not go on (e.g. the server died); finished shards are kept."""


class RunLocked(RuntimeError):
    """Another densecap process is writing the same rank of the same output directory."""


class RunLock:
    """``<out>/densecap-rank<R>.lock``: an exclusive ``flock`` held for the whole run, with the
    holder's pid, host and command line in the file. The kernel drops the lock when the
    holder dies (SIGKILL included), so a stale file never blocks a rerun; a second live run
    on the same directory and rank stops at once with :class:`RunLocked` naming the holder."""

    def __init__(self, out: Path, rank: int):
        self.path = Path(out) / f"densecap-rank{rank}.lock"
        self.rank = rank
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            who = (
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                f"{holder.get('command', '?')}"
            )
            raise RunLocked(
                f"{self.path.parent}: rank {self.rank} is being written by another densecap process ({who}); "
                f"wait for it to finish or stop it (kill {holder.get('pid', '<pid>')}), then rerun. Lock file: {self.path}"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (the process that started it) ends, however it
    ends: a parent-death signal on Linux, and a watchdog thread on the parent pid everywhere."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="densecap-parent-watchdog", daemon=True).start()


def rejects_path(out: Path, split: str, index: int) -> Path:
    return out / REJECTS_DIR / (shard_name(split, index)[: -len(".tar")] + ".rejects.jsonl")


class Worker:
    """Everything one process needs to turn units into shards."""

    def __init__(self, cfg: DensecapConfig, out: Path, image_exts: dict[str, str | None] | None = None):
        self.cfg = cfg
        self.out = Path(out)
        #: split -> the one image extension its shards use (None: images as they come)
        self.image_exts = dict(image_exts or {})
        self.source: ImageSource = IMAGE_SOURCES.create(cfg.source.type, cfg.source.params, "source.params")
        self.captioners: list[CaptionSource] = []
        for i, c in enumerate(cfg.caption_sources):
            cls = CAPTION_SOURCES.get(c.type)
            params = CAPTION_SOURCES.parse_params(c.type, c.params, f"caption_sources[{i}].params")
            self.captioners.append(cls(params, label=c.label or c.type))
        self.chain = FilterChain(
            [FILTERS.create(f.type, f.params, f"filters[{i}].params") for i, f in enumerate(cfg.filters)]
        )
        self.loop = asyncio.new_event_loop()
        self.started = False
        #: more entries for every shard's stats file (the Ray executor: which process wrote it)
        self.stats_extra: dict[str, Any] = {}

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
                rejects.append(
                    {
                        "kind": "image",
                        "key": item.key,
                        "id": item.id,
                        "path": item.path,
                        "reason": "duplicate key in unit",
                    }
                )
                continue
            seen.add(item.key)
            item.image_ext = ext
            if item.split != unit.split:
                item.split = unit.split
            yield item

    def _caption_batch(self, batch: list[Sample], counts: Counter, rejects: list[dict]) -> None:
        """Caption what needs it, then filter every caption of the batch in shard order.

        A fill (a rerun of a shard with failed captions) requests only the failed or missing
        captions, but every caption, kept or new, goes through the filter chain again in the
        same order as in a first pass, so stateful filters (near-duplicates) see the whole shard
        and the verdicts are those a single clean pass would give."""
        for cap in self.captioners:
            new = self._request(cap, batch, counts)
            for s in batch:
                for d in [d for d in s.dense if d.source == cap.label]:
                    self._filter(s, d, counts, rejects)
                    if id(s) not in new:
                        counts["captions_refiltered"] += 1

    def _request(self, cap: CaptionSource, batch: list[Sample], counts: Counter) -> dict[int, Any]:
        """Ask ``cap`` for the samples without a good text from it; id(sample) -> its new text."""
        todo: list[Sample] = []
        slot: dict[int, int] = {}  # id(sample) -> where its text from this source sits
        for s in batch:
            mine = [d for d in s.dense if d.source == cap.label]
            if mine and not self.cfg.recaption and not any(d.error for d in mine):
                continue
            slot[id(s)] = next((i for i, d in enumerate(s.dense) if d.source == cap.label), len(s.dense))
            s.dense = [d for d in s.dense if d.source != cap.label]
            todo.append(s)
        new: dict[int, Any] = {}
        if not todo:
            return new
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
            s.dense.insert(slot[id(s)], d)
            new[id(s)] = d
            counts["prompt_tokens"] += int(d.scores.get("prompt_tokens", 0))
            counts["completion_tokens"] += int(d.scores.get("completion_tokens", 0))
        return new

    def _filter(self, s: Sample, d: Any, counts: Counter, rejects: list[dict]) -> None:
        """The filter chain's verdict on one caption, counted; errors and drops go to ``rejects``."""
        verdict = self.chain.apply(d, s)
        if d.error:
            counts["caption_errors"] += 1
            rejects.append(
                {"kind": "caption", "key": s.key, "id": s.id, "source": d.source, "reason": "error", "error": d.error}
            )
        elif verdict == "keep":
            counts["captions_kept"] += 1
        else:
            counts["captions_dropped"] += 1
            counts[f"dropped_{verdict}"] += 1
            rejects.append(
                {
                    "kind": "caption",
                    "key": s.key,
                    "id": s.id,
                    "source": d.source,
                    "reason": verdict,
                    "text": d.text,
                    "scores": d.scores,
                }
            )

    def _endpoint_stats(self, since: dict | None = None) -> dict[str, dict]:
        """label -> url -> {ok, failed[, down]} for caption sources with several servers (counts
        since the ``since`` snapshot when given)."""
        out: dict[str, dict] = {}
        for c in self.captioners:
            eps = c.endpoint_stats() if len(getattr(c, "endpoints", ())) > 1 else None
            if not eps:
                continue
            before = (since or {}).get(c.label, {})
            out[c.label] = {
                url: {
                    **e,
                    "ok": e["ok"] - before.get(url, {}).get("ok", 0),
                    "failed": e["failed"] - before.get(url, {}).get("failed", 0),
                }
                for url, e in eps.items()
            }
        return out

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
        endpoints0 = self._endpoint_stats()
        self.chain.reset()
        t0 = time.perf_counter()
        image_ext = self.image_exts.get(unit.split)
        with ShardWriter(self.out, unit.split, unit.index, image_ext=image_ext) as w:
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
                image_ext=image_ext or "mixed",
                config_hash=config_fingerprint(self.cfg),
            )
            endpoints = self._endpoint_stats(since=endpoints0)
            w.stats.update(self.stats_extra)
            if endpoints:  # several servers: what each answered and failed for this shard, and which are out
                w.stats["endpoints"] = endpoints
            stats = dict(w.stats)
        stats.update(shard=out_tar.name, count=w.count)
        return stats


EXECUTION_FIELDS = ("num_workers", "batch_size", "progress", "executor")
#: config keys hashed under their old name, so that renaming a key never makes shards stale
HASH_KEYS = {"caption_sources": "captioners"}


def strip_transport(captioners: list[dict]) -> list[dict]:
    """Caption-source entries (plain dicts) without the params their type declares as transport."""
    out = []
    for c in captioners:
        c = dict(c)
        try:
            drop = set(getattr(CAPTION_SOURCES.get(c.get("type", "")), "transport_params", ()))
        except ConfigError:
            drop = set()
        c["params"] = {k: v for k, v in (c.get("params") or {}).items() if k not in drop}
        out.append(c)
    return out


def content_config(cfg: DensecapConfig | StageConfig) -> dict[str, Any]:
    """What decides a shard's content: the image source, the caption sources (model, prompt,
    sampling...) without their transport params (server address, key, concurrency, timeouts,
    retries), the filters, the image format and ``recaption``; not workers, batch size, progress
    bars or the executor. Keys renamed since shards were first written keep their old name here
    (:data:`HASH_KEYS`), so the fingerprint of an unchanged configuration never changes."""
    if isinstance(cfg, StageConfig):
        cfg = cfg.config
    doc = {HASH_KEYS.get(k, k): v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    doc["captioners"] = strip_transport(doc["captioners"])
    return doc


def config_fingerprint(cfg: DensecapConfig | StageConfig) -> str:
    """Hash of :func:`content_config`: a complete shard written under another one is captioned again."""
    return hashlib.sha256(json.dumps(content_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_image_exts(source: ImageSource, units: list[Unit], setting: str) -> dict[str, str | None]:
    """split -> the image extension its shards are written with (None = as the images come).

    'auto' asks the source (:meth:`ImageSource.split_image_ext`: the most common format of the
    split, or its first image's), so every rank and every rerun picks the same one."""
    splits = list(dict.fromkeys(u.split for u in units))
    if setting == "keep":
        return {sp: None for sp in splits}
    if setting != "auto":
        return {sp: setting for sp in splits}
    out: dict[str, str | None] = {}
    for sp in splits:
        out[sp] = source.split_image_ext(sp, [u for u in units if u.split == sp])
        log.info("split %s: images written as .%s (image_ext auto; other formats are re-encoded)", sp, out[sp])
    return out


def plan_units(
    source: ImageSource, out: Path, rank: int, world_size: int, fingerprint: str | None = None, *, clean: bool = True
) -> tuple[list[Unit], list[Unit]]:
    """(this rank's units still to do, all of this rank's units).

    A complete shard is redone when it recorded caption errors (to fill them) or when it was
    written under another configuration (``fingerprint``: other sources, prompts or filters).
    ``clean=False`` leaves an unfinished unit's leftovers for whoever writes it (the Ray executor's
    workers clear them under the unit's lock: :func:`process_exclusively`).
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
        if clean and (st is None or stale):  # leftovers of an interrupted write of this unit (never other ranks' units)
            p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            stats_path(p).unlink(missing_ok=True)
        todo.append(u)
    return todo, mine


UNIT_LOCKS = ".densecap-units"


def process_exclusively(worker: Worker, unit: Unit, fingerprint: str) -> dict[str, Any]:
    """Write ``unit`` while holding ``<out>/.densecap-units/<shard>.lock`` (an flock the kernel drops
    when the holder dies), for executors whose workers are not children of the process holding the
    rank lock (Ray): a retry of a unit, or a rerun after its driver was killed, waits for any earlier
    attempt still writing it, then looks again. A shard completed meanwhile is not written twice
    (its stats come back with ``skipped: true``); otherwise the earlier attempt's leftovers are
    cleared here, under the lock, and the unit is written as by the local executor."""
    import fcntl

    lock_dir = worker.out / UNIT_LOCKS
    lock_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(unit.split, unit.index)
    fd = os.open(lock_dir / (name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while an earlier attempt's process still lives
        p = worker.out / name
        sp = stats_path(p)
        st = None
        if p.exists() and sp.exists():
            try:
                st = json.loads(sp.read_text())
            except ValueError:
                st = None
        stale = st is not None and st.get("config_hash") not in (None, fingerprint)
        if st is not None and not st.get("caption_errors") and not stale:
            return {**st, "shard": name, "count": st.get("count", 0), "skipped": True}
        if st is None or stale:
            p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            sp.unlink(missing_ok=True)
        return worker.process(unit)
    finally:
        os.close(fd)


# ---- multi-process ----------------------------------------------------------------
_WORKER: Worker | None = None


def _init_worker(cfg_dict: dict, out: str, image_exts: dict, parent_pid: int) -> None:
    global _WORKER
    die_with_parent(parent_pid)
    from d2s.config import from_dict
    from d2s.log import setup_logging

    setup_logging()
    _WORKER = Worker(from_dict(DensecapConfig, cfg_dict, "config"), Path(out), image_exts)


def _work(unit: Unit) -> dict:
    assert _WORKER is not None
    stats = _WORKER.process(unit)
    stats["fatal"] = _WORKER.fatal
    return stats


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a densecap job; returns a summary. Raises RunAborted when a source died,
    RunLocked when another process is writing the same rank of ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, cfg.rank):
        return _run_locked(cfg, out)


def _run_locked(cfg: RunConfig, out: Path) -> dict[str, Any]:
    base = cfg.config
    atomic_write_text(out / f"densecap-config.rank{cfg.rank}.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    worker = Worker(base, out)
    on_ray = base.executor.type == "ray"
    todo, mine = plan_units(worker.source, out, cfg.rank, cfg.world_size, config_fingerprint(base), clean=not on_ray)
    image_exts = resolve_image_exts(worker.source, worker.source.units(), base.image_ext) if todo else {}
    worker.image_exts = image_exts
    log.info(
        "densecap: %d unit(s) for rank %d/%d, %d already complete",
        len(todo),
        cfg.rank,
        cfg.world_size,
        len(mine) - len(todo),
    )
    results: list[dict] = []
    ray_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with _progress(cfg, todo, results, t0) as tick:
        if on_ray:
            worker.close()
            fatal = _run_on_ray(base, out, todo, image_exts, results, tick, ray_info)
        elif base.num_workers == 1 or len(todo) <= 1:
            fatal = _run_inline(worker, todo, results, tick)
        else:
            worker.close()
            fatal = _run_pool(base, out, todo, image_exts, results, tick)
    summary = _summary(cfg, mine, results, ray_info, time.perf_counter() - t0)
    summary["complete"] = _finish_if_complete(cfg, out, worker.source)
    log.info("densecap summary: %s", json.dumps(summary))
    if fatal:
        raise RunAborted(
            f"stopped after {len(results)} shard(s): {fatal}. Finished shards are kept; "
            "failed captions are recorded with their error; rerun the same command to fill them."
        )
    return summary


@contextlib.contextmanager
def _progress(cfg: RunConfig, todo: list[Unit], results: list[dict], t0: float):
    """A progress bar over this rank's images; yields ``tick(n)`` (n images more done)."""
    from tqdm import tqdm

    known = [u.size for u in todo]
    total = sum(known) if all(k is not None for k in known) else None
    bar = tqdm(
        total=total, desc=f"densecap rank {cfg.rank}", unit="img", disable=not cfg.config.progress, dynamic_ncols=True
    )

    def tick(n: int) -> None:
        bar.update(n)
        el = time.perf_counter() - t0
        rate = sum(r.get("captions_requested", 0) for r in results) / el if el else 0
        bar.set_postfix_str(f"{rate:.1f} cap/s shards {len(results)}/{len(todo)}")

    try:
        yield tick
    finally:
        bar.close()


def _run_on_ray(base: DensecapConfig, out: Path, todo, image_exts, results, tick, ray_info) -> str:
    if not todo:
        return ""
    from .ray_executor import run_units

    return run_units(base, out, todo, image_exts, results, tick, ray_info)


def _run_inline(worker: Worker, todo: list[Unit], results: list[dict], tick) -> str:
    """Units one after the other in this process; returns why a caption source stopped ('' if none)."""
    try:
        for u in todo:
            results.append(worker.process(u, progress=tick))
            tick(0)
            if worker.fatal:
                return worker.fatal
        return ""
    finally:
        worker.close()


def _run_pool(base: DensecapConfig, out: Path, todo: list[Unit], image_exts: dict, results: list[dict], tick) -> str:
    """Units in ``num_workers`` processes that die with this one."""
    import multiprocessing as mp

    with ProcessPoolExecutor(
        base.num_workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(to_dict(base), str(out), image_exts, os.getpid()),
    ) as ex:
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


# per-shard stats that are not summed into the run summary
_NOT_SUMMED = ("index", "schema_version", "bytes", "seconds", "captions_per_s", "completion_tokens_per_s")


def _summary(cfg: RunConfig, mine: list[Unit], results: list[dict], ray_info: dict, seconds: float) -> dict[str, Any]:
    agg: Counter = Counter()
    for r in results:
        if r.get("skipped"):  # completed by an earlier attempt while this run waited for its lock
            continue
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_SUMMED:
                agg[k] += v
    on_ray = cfg.config.executor.type == "ray"
    return {
        "units_total": len(mine),
        "units_run": len(results),
        "executor": cfg.config.executor.type,
        **({"units_skipped": sum(1 for r in results if r.get("skipped")), **ray_info} if on_ray else {}),
        "seconds": round(seconds, 2),
        "captions_per_s": round(agg.get("captions_requested", 0) / seconds, 3) if seconds else 0.0,
        **{k: int(v) if float(v).is_integer() else round(v, 3) for k, v in agg.items()},
    }


def _finish_if_complete(cfg: RunConfig, out: Path, source: ImageSource) -> bool:
    """When every unit of every rank is complete, write the manifest and the report."""
    complete = completed_shards(out)
    all_done = all(str(out / shard_name(u.split, u.index)) in complete for u in source.units())
    if all_done:
        from d2s.shards import write_manifest

        from .report import write_report

        write_manifest(out)
        write_report(out, Path(cfg.report) if cfg.report else out / "report")
    return all_done
