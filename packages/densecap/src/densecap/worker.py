"""densecap's unit job: the :class:`Worker` that turns one unit into one output shard, the
shard fingerprint, the one rule that says whether a shard is done, and unit planning.

This module is the base the executors build on (``densecap.executors``); it imports none of them.
The rule (:func:`shard_state`) and the planning (:func:`plan_units`) take units, an output
directory and a fingerprint only, so another unit job (input shard -> output shard) reuses them.

Only what decides a caption's content makes a complete shard stale (:func:`content_config`:
source, caption sources without their ``transport_params``, filters, image format,
``recaption``): moving the server or changing concurrency, timeouts or retries keeps every
finished caption.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from d2s.atomic import atomic_write_text
from d2s.config import ConfigError, from_dict, to_dict
from d2s.grounding import ScorerError, clear_grounding
from d2s.schema import Sample
from d2s.shards import ShardWriter, completed_shards, iter_samples, shard_name, stats_path

from .caption_sources import CAPTION_SOURCES, CaptionSource
from .config import DensecapConfig, execution_fields
from .filters import FILTERS, FilterChain
from .grounding import Grounder
from .images import IMAGE_SOURCES, ImageSource, Rejected, Unit, check_image

log = logging.getLogger(__name__)

REJECTS_DIR = "rejects"
#: a complete shard whose stats hold a true value under this key is redone from its own samples
RETRY_KEY = "caption_errors"


class RunAborted(RuntimeError):
    """A caption source could not go on (e.g. the server died); finished shards are kept."""


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
        self.caption_sources: list[CaptionSource] = []
        for i, c in enumerate(cfg.caption_sources):
            cls = CAPTION_SOURCES.get(c.type)
            params = CAPTION_SOURCES.parse_params(c.type, c.params, f"caption_sources[{i}].params")
            self.caption_sources.append(cls(params, label=c.label or c.type))
        self.chain = FilterChain(
            [FILTERS.create(f.type, f.params, f"filters[{i}].params") for i, f in enumerate(cfg.filters)]
        )
        self.grounder = Grounder(cfg.grounding, self._reference_samples) if cfg.grounding else None
        self.loop = asyncio.new_event_loop()
        self.started = False
        #: more entries for every shard's stats file (the Ray executor: which process wrote it)
        self.stats_extra: dict[str, Any] = {}

    def start(self) -> None:
        if not self.started:
            for c in self.caption_sources:
                self.loop.run_until_complete(c.start())
            self.started = True

    def close(self) -> None:
        for c in self.caption_sources:
            try:
                self.loop.run_until_complete(c.close())
            except Exception:  # noqa: BLE001
                log.exception("closing caption source %s", c.label)
        self.loop.close()

    @property
    def fatal(self) -> str:
        return "; ".join(f"{c.label}: {c.fatal}" for c in self.caption_sources if c.fatal)

    # -------------------------------------------------------------------------------
    def _reference_samples(self) -> Iterator[Sample]:
        """The image source's readable images in unit order: grounding's calibration bank."""
        for unit in self.source.units():
            for item in self.source.iter_unit(unit):
                if not isinstance(item, Rejected) and check_image(item.image)[0] is not None:
                    yield item

    def _ground(self, batch: list[Sample], counts: Counter, rejects: list[dict], shard: str) -> None:
        """Grounding when configured; without it, undo what an earlier grounding did."""
        if self.grounder is not None:
            try:
                self.grounder.ground(batch, counts, rejects)
            except ScorerError as exc:  # name the shard too
                raise ScorerError(f"shard {shard}: {exc}") from None
            return
        for s in batch:
            for d in s.dense:
                if d.scorer:
                    clear_grounding(d)

    @staticmethod
    def _tally(batch: list[Sample], counts: Counter) -> None:
        """Kept and dropped captions by their final verdict (after filters and grounding)."""
        for s in batch:
            for d in s.dense:
                if d.error:
                    continue
                if d.verdict == "keep":
                    counts["captions_kept"] += 1
                else:
                    counts["captions_dropped"] += 1
                    counts[f"dropped_{d.verdict}"] += 1

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
        for cap in self.caption_sources:
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
        elif verdict != "keep":  # kept / dropped are tallied after grounding (_tally)
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
        for c in self.caption_sources:
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
        retries0 = sum(getattr(c, "retries", 0) for c in self.caption_sources)
        endpoints0 = self._endpoint_stats()
        self.chain.reset()
        t0 = time.perf_counter()
        image_ext = self.image_exts.get(unit.split)
        with ShardWriter(self.out, unit.split, unit.index, image_ext=image_ext) as w:
            batch: list[Sample] = []

            def flush() -> None:
                self._caption_batch(batch, counts, rejects)
                self._ground(batch, counts, rejects, out_tar.name)
                self._tally(batch, counts)
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
                caption_sources=[c.label for c in self.caption_sources],
                max_in_flight={c.label: getattr(c, "max_in_flight", 1) for c in self.caption_sources},
                retries=sum(getattr(c, "retries", 0) for c in self.caption_sources) - retries0,
                filters=[f.name for f in self.chain.filters],
                image_ext=image_ext or "mixed",
                config_hash=config_fingerprint(self.cfg),
                grounding_hash=grounding_fingerprint(self.cfg),
            )
            if self.grounder is not None and self.grounder.scored:
                w.stats["scorer"] = self.grounder.scorer_id
            endpoints = self._endpoint_stats(since=endpoints0)
            w.stats.update(self.stats_extra)
            if endpoints:  # several servers: what each answered and failed for this shard, and which are out
                w.stats["endpoints"] = endpoints
            stats = dict(w.stats)
        stats.update(shard=out_tar.name, count=w.count)
        return stats


def make_worker(config: dict[str, Any], out: Path) -> Worker:
    """The worker factory of densecap's job (``WorkerSpec.factory``): ``config`` holds the
    :class:`DensecapConfig` as plain data (``"config"``) and ``image_exts``."""
    cfg = from_dict(DensecapConfig, config["config"], "config")
    return Worker(cfg, Path(out), config.get("image_exts") or {})


def check_servers(config: dict[str, Any], out: Path) -> None:
    """The driver's check before any cluster is started or joined (``WorkerSpec.check``): start,
    then close, every caption source that talks to a server (those declaring
    ``transport_params``, e.g. vllm-server's ``/v1/models`` check). Sources that load a model
    or read local files are started by the workers only. Raises what their ``start()`` raises."""
    cfg = from_dict(DensecapConfig, config["config"], "config")
    loop = asyncio.new_event_loop()
    try:
        for i, c in enumerate(cfg.caption_sources):
            cls = CAPTION_SOURCES.get(c.type)
            if not getattr(cls, "transport_params", ()):
                continue
            src = cls(
                CAPTION_SOURCES.parse_params(c.type, c.params, f"caption_sources[{i}].params"), label=c.label or c.type
            )
            try:
                loop.run_until_complete(src.start())
            finally:
                loop.run_until_complete(src.close())
    finally:
        loop.close()


# ---- fingerprint ----------------------------------------------------------------------
def strip_transport(caption_sources: list[dict]) -> list[dict]:
    """Caption-source entries (plain dicts) without the params their type declares as transport."""
    out = []
    for c in caption_sources:
        c = dict(c)
        try:
            drop = set(getattr(CAPTION_SOURCES.get(c.get("type", "")), "transport_params", ()))
        except ConfigError:
            drop = set()
        c["params"] = {k: v for k, v in (c.get("params") or {}).items() if k not in drop}
        out.append(c)
    return out


def content_config(cfg: DensecapConfig) -> dict[str, Any]:
    """What decides a shard's content: the :class:`DensecapConfig` fields not marked
    ``EXECUTION`` (so not workers, batch size, progress bars, the executor, nor a
    :class:`~densecap.config.StageConfig`'s rank or a RunConfig's paths), with the caption
    sources' transport params (server address, key, concurrency, timeouts, retries) left out."""
    skip = set(execution_fields(DensecapConfig)) | {"grounding"}
    doc = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(DensecapConfig) if f.name not in skip}
    doc["caption_sources"] = strip_transport(doc["caption_sources"])
    return doc


def grounding_fingerprint(cfg: DensecapConfig) -> str:
    """Hash of the grounding settings that decide a shard's content ('' without grounding). A
    shard written under another one is redone from its own samples: captions are kept, and so
    are stored sentence scores of the same scorer (a new threshold or action scores nothing)."""
    if cfg.grounding is None:
        return ""
    doc = to_dict(cfg.grounding)
    doc.pop("batch_size", None)
    doc["scorer"]["params"] = {k: v for k, v in doc["scorer"]["params"].items() if k not in HOW_TO_SCORE}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: scorer params that decide how fast, not what (left out of grounding_fingerprint)
HOW_TO_SCORE = ("batch_size", "device", "progress")


def config_fingerprint(cfg: DensecapConfig) -> str:
    """Hash of :func:`content_config`: a complete shard written under another one is captioned again."""
    return hashlib.sha256(json.dumps(content_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the staleness rule and planning -------------------------------------------------------
def shard_state(
    stats: dict[str, Any] | None,
    fingerprint: str | None,
    retry_key: str = RETRY_KEY,
    expect: dict[str, Any] | None = None,
) -> Literal["done", "fill", "redo"]:
    """The one rule for a unit's output shard, given its stats (None: not complete).

    ``done``: complete, written under ``fingerprint`` (or with no fingerprint to compare), nothing
    failed; ``fill``: complete and current, but ``stats[retry_key]`` says something failed, or a
    stats value differs from ``expect`` (a missing key reads ""; densecap's ``grounding_hash``):
    redo it from its own samples; ``redo``: missing, or written under another configuration:
    clear what is there and write it from the input."""
    if stats is None:
        return "redo"
    if fingerprint is not None and stats.get("config_hash") not in (None, fingerprint):
        return "redo"
    if stats.get(retry_key) or any(stats.get(k, "") != v for k, v in (expect or {}).items()):
        return "fill"
    return "done"


def clear_unit(out: Path, name: str) -> None:
    """Remove what an earlier attempt left of shard ``name``: its ``.tmp``, tar and stats."""
    p = Path(out) / name
    p.with_name(p.name + ".tmp").unlink(missing_ok=True)
    p.unlink(missing_ok=True)
    stats_path(p).unlink(missing_ok=True)


def read_stats(out: Path, name: str) -> dict[str, Any] | None:
    """The stats of shard ``name`` when it is complete (tar and stats file), else None."""
    p = Path(out) / name
    if not (p.exists() and stats_path(p).exists()):
        return None
    try:
        return json.loads(stats_path(p).read_text())
    except ValueError:
        return None


def plan_units(
    units: list[Unit],
    out: Path,
    rank: int,
    world_size: int,
    fingerprint: str | None = None,
    *,
    clean: bool = True,
    retry_key: str = RETRY_KEY,
    expect: dict[str, Any] | None = None,
) -> tuple[list[Unit], list[Unit]]:
    """(this rank's units still to do, all of this rank's units), by :func:`shard_state`.

    Units are dealt round-robin (``unit_number % world_size == rank``). ``clean=False`` leaves an
    unfinished unit's leftovers for whoever writes it (the Ray executor's workers clear them under
    the unit's lock)."""
    names = [shard_name(u.split, u.index) for u in units]
    if len(set(names)) != len(names):
        raise ValueError("image source produced two units with the same split and index")
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    done = completed_shards(out)
    todo = []
    for u in mine:
        p = Path(out) / shard_name(u.split, u.index)
        st = done.get(str(p))
        state = shard_state(st, fingerprint, retry_key, expect)
        if state == "done":
            continue
        if state == "redo" and st is not None:
            log.warning("%s was written under another configuration: captioning it again", p.name)
        if clean and state == "redo":  # leftovers of an interrupted write of this unit (never other ranks' units)
            clear_unit(out, p.name)
        todo.append(u)
    return todo, mine


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
