"""The contamination guard: ``densecap contamination`` (``docs/corpus-integrity.md``).

Training images (finished shards) are compared with evaluation sets by perceptual hash, the same
64-bit pHash and 3 x 3 crop grid as :mod:`densecap.dedup` (the training side reuses its per-shard
signature files), and, when a vse bundle or a Hugging Face encoder is given, by image-embedding
cosine similarity (through the sentence-scorer registry, ``d2s.grounding.SCORERS``). Evaluation
sets: ``shards:DIR[:SPLIT]`` (this project's shards, e.g. a bench split; split ``test`` by
default), ``karpathy:JSON:IMAGE_ROOT[:SPLIT]`` (a Karpathy split file) or ``folder:DIR``.

Writes, in every training directory, ``integrity/contamination.json`` (read by
:func:`d2s.integrity.read_integrity`: ``vse train`` warns or refuses) and
``integrity/contamination.html`` (each matched pair side by side).
"""

from __future__ import annotations

import base64
import html
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from d2s.atomic import atomic_write_json, atomic_write_text
from d2s.integrity import CONTAMINATION_FILE, INDEX_VERSION, CorpusError, integrity_dir
from d2s.schema import SampleError

from .card import refresh_card
from .dedup import (
    DedupConfig,
    DedupParams,
    compute_signatures,
    corpus_units,
    crop_matches,
    hamming_pairs,
    image_hashes,
    load_signatures,
    shard_sizes,
)
from .executors.base import ExecutorConfig

log = logging.getLogger(__name__)
HTML_FILE = "contamination.html"


@dataclass
class ContaminationConfig:
    inputs: list[str] = field(default_factory=list)  # training shard directories
    against: list[str] = field(default_factory=list)  # evaluation sets (see the module docstring)
    distance: int = 4  # whole-image pHash bits
    crop_distance: int = 8  # whole vs a crop of the other (pHash bits)
    crop_dhash_distance: int = 12  # ... and their dHashes (a second check, see densecap.dedup.DedupParams)
    crops: bool = True
    bundle: str = ""  # a vse bundle: embedding similarity too
    hf_encoder: str = ""  # or a Hugging Face dual encoder (hub name or folder)
    similarity: float = 0.95  # cosine of image embeddings that counts as a match
    batch_size: int = 64
    progress: bool = True
    # who computes the training images' signatures (shared with densecap dedup: one run reuses
    # the other's files), as for densecap run: inline, a process pool, or Ray
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    num_workers: int = 1
    max_pairs_shown: int = 500  # contamination.html shows the first this many pairs (the JSON has all)

    def __post_init__(self) -> None:
        if not self.against:
            raise ValueError("against: give at least one evaluation set (shards:DIR[:SPLIT], karpathy:..., folder:DIR)")
        if self.bundle and self.hf_encoder:
            raise ValueError("bundle and hf_encoder: give one of them")


@dataclass
class EvalImages:
    """An evaluation set, read as a stream of (id, image bytes), never held in memory whole:
    hashed once, streamed again for embeddings and for the matched pairs' page."""

    name: str  # the spec as given
    stream: Callable[[], Iterator[tuple[str, bytes]]]
    ids: list[str] = field(default_factory=list)  # in stream order, once hashed

    def images(self, wanted: set[str]) -> dict[str, bytes]:
        return {i: b for i, b in self.stream() if i in wanted}

    def batches(self, size: int) -> Iterator[tuple[list[bytes], list[str]]]:
        images, ids = [], []
        for i, b in self.stream():
            images.append(b)
            ids.append(i)
            if len(images) == size:
                yield images, ids
                images, ids = [], []
        if images:
            yield images, ids


def load_eval_images(spec: str, where: str) -> EvalImages:
    """One evaluation set (checked now: paths, split; read later); errors name the spec and what is missing."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "shards" and parts:
        d = Path(parts[0])
        split = parts[1] if len(parts) > 1 else "test"
        if not d.exists():
            raise CorpusError(f"{where}: {spec!r}: {d} does not exist")
        from d2s.shards import iter_samples, split_shards

        try:
            shards = split_shards(d, split)
        except KeyError as exc:
            raise CorpusError(f"{where}: {spec!r}: {exc.args[0]}") from None
        return EvalImages(spec, lambda: ((s.key, s.image) for s in iter_samples(shards)))
    if kind == "karpathy" and len(parts) >= 2:
        json_path, root = Path(parts[0]), Path(parts[1])
        for p in (json_path, root):
            if not p.exists():
                raise CorpusError(f"{where}: {spec!r}: {p} does not exist")
        params = {"path": str(json_path), "image_root": str(root), "splits": [parts[2] if len(parts) > 2 else "test"]}
        return _from_source(spec, "karpathy", params, where)
    if kind == "folder" and parts:
        if not Path(parts[0]).is_dir():
            raise CorpusError(f"{where}: {spec!r}: {parts[0]} does not exist or is not a directory")
        return _from_source(spec, "folder", {"path": parts[0]}, where)
    raise CorpusError(f"{where}: {spec!r}: expected shards:DIR[:SPLIT], karpathy:JSON:IMAGE_ROOT[:SPLIT] or folder:DIR")


def _from_source(spec: str, typ: str, params: dict, where: str) -> EvalImages:
    """A densecap image source (karpathy, folder) as an evaluation set; an unreadable image is an error."""
    from .images import IMAGE_SOURCES, Rejected

    src = IMAGE_SOURCES.create(typ, params, f"{where} ({spec})")

    def stream() -> Iterator[tuple[str, bytes]]:
        for u in src.units():
            for item in src.iter_unit(u):
                if isinstance(item, Rejected):
                    raise CorpusError(f"{where}: {spec!r}: image {item.path or item.id} unreadable: {item.reason}")
                yield item.id, item.image

    return EvalImages(spec, stream)


def _hash_eval(ev: EvalImages, crops: bool, progress: bool) -> np.ndarray:
    """The evaluation set's hashes (whole [+ crops]), filling ``ev.ids``; errors name the image."""
    hashes = []
    ev.ids = []
    for i, data in tqdm(ev.stream(), desc=f"hashing {ev.name}", unit="img", disable=not progress):
        try:
            hashes.append(image_hashes(data, crops))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            raise SampleError(f"{ev.name}: image {i!r} unreadable ({type(exc).__name__}: {exc})") from None
        ev.ids.append(i)
    if not hashes:
        raise CorpusError(f"{ev.name}: no images")
    return np.array(hashes, dtype=np.uint64)


def _scorer(cfg: ContaminationConfig):
    """The image embedder: a vse bundle or an HF dual encoder, through the sentence-scorer registry."""
    from d2s.grounding import SCORERS

    typ, params = ("vse-bundle", {"path": cfg.bundle}) if cfg.bundle else ("hf-dual-encoder", {"model": cfg.hf_encoder})
    return SCORERS.create(typ, params, "bundle" if cfg.bundle else "hf_encoder")


def _embed(scorer, batches) -> np.ndarray:
    """L2-normalised image embeddings of ``(images, keys)`` batches, stacked."""
    out = [scorer.embed_images(images, keys).numpy() for images, keys in batches]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _shard_batches(shards: list[str], size: int):
    """The training images shard by shard, in signature order, ``size`` at a time (never all in memory)."""
    from d2s.shards import iter_samples

    images, keys = [], []
    for s in iter_samples(shards):
        images.append(s.image)
        keys.append(s.key)
        if len(images) == size:
            yield images, keys
            images, keys = [], []
    if images:
        yield images, keys


def contamination(cfg: ContaminationConfig) -> dict[str, Any]:
    """Compare, write ``integrity/contamination.json`` and ``.html`` in every input; returns counts."""
    t0 = time.perf_counter()
    evals = [load_eval_images(s, f"against[{i}]") for i, s in enumerate(cfg.against)]
    units = corpus_units([str(Path(p)) for p in cfg.inputs])
    params = DedupParams(crops=cfg.crops)
    compute_signatures(
        DedupConfig(
            inputs=[str(Path(p)) for p in cfg.inputs],
            params=params,
            executor=cfg.executor,
            num_workers=cfg.num_workers,
            progress=cfg.progress,
        ),
        units,
        "contamination",
    )
    train = load_signatures(units, params)
    # (train index, eval set, eval index, method) -> the match (one row per method that matched)
    found: dict[tuple[int, int, int, str], dict] = {}
    te: np.ndarray | None = None
    for e, ev in enumerate(evals):
        eh = _hash_eval(ev, cfg.crops, cfg.progress)
        tw, ew = train.image_hashes[:, 0], eh[:, 0]
        for i, j, d in zip(*hamming_pairs(tw, ew, cfg.distance, same=False)):
            found[(int(i), e, int(j), "phash")] = {"method": "phash", "distance": int(d)}
        if cfg.crops:  # whole images of one side vs the grid crops of the other, both ways
            th = train.image_hashes
            both = (
                crop_matches(tw, th[:, 10], eh, cfg.crop_distance, cfg.crop_dhash_distance).items(),
                (
                    ((ti, ei), d)
                    for (ei, ti), d in crop_matches(
                        ew, eh[:, 10], th, cfg.crop_distance, cfg.crop_dhash_distance
                    ).items()
                ),
            )
            for matches in both:
                for (ti, ei), d in matches:
                    if (ti, e, ei, "phash") in found:
                        continue
                    m = found.setdefault((ti, e, ei, "phash_crop"), {"method": "phash_crop", "distance": d})
                    m["distance"] = min(m["distance"], d)
        if cfg.bundle or cfg.hf_encoder:
            if te is None:  # the training images' embeddings, once, streamed shard by shard
                scorer = _scorer(cfg)
                te = _embed(scorer, _shard_batches([u.payload["shard"] for u in units], cfg.batch_size))
            sims = te @ _embed(scorer, ev.batches(cfg.batch_size)).T
            for i, j in zip(*np.nonzero(sims >= cfg.similarity)):
                sim = round(float(sims[i, j]), 4)
                found[(int(i), e, int(j), "embedding")] = {"method": "embedding", "similarity": sim}
    matches = []
    for (ti, e, ei, _), m in sorted(found.items()):
        d, shard, key = train.items[ti]
        matches.append(
            {"dir": d, "shard": shard, "key": key, "benchmark": evals[e].name, "item": evals[e].ids[ei], **m}
        )
    for d in cfg.inputs:
        mine = [{k: v for k, v in m.items() if k != "dir"} for m in matches if m["dir"] == str(Path(d))]
        doc = {
            "version": INDEX_VERSION,
            "against": list(cfg.against),
            "params": {
                "distance": cfg.distance,
                "crop_distance": cfg.crop_distance,
                "crop_dhash_distance": cfg.crop_dhash_distance,
                "crops": cfg.crops,
            },
            "embedding": cfg.bundle or cfg.hf_encoder or "",
            "counts": {"images": len(train.items), "flagged_images": len({(m["shard"], m["key"]) for m in mine})},
            "shards": shard_sizes(units, d),
            "matches": mine,
        }
        atomic_write_json(integrity_dir(d) / CONTAMINATION_FILE, doc)
        _write_html(integrity_dir(d) / HTML_FILE, mine, Path(d), {ev.name: ev for ev in evals}, cfg.max_pairs_shown)
        refresh_card(d)
    flagged = len({(m["dir"], m["shard"], m["key"]) for m in matches})
    return {
        "images": len(train.items),
        "evaluation_images": {ev.name: len(ev.ids) for ev in evals},
        "matches": len(matches),
        "flagged_images": flagged,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _train_images(items: list[tuple[str, str, str]]) -> list[bytes]:
    """The image bytes of ``items`` (dir, shard, key), in order."""
    from d2s.shards import iter_samples

    want: dict[str, dict[str, bytes]] = {}
    for d, shard, _ in items:
        want.setdefault(str(Path(d) / shard), {})
    for p in want:
        for s in iter_samples([p]):
            want[p][s.key] = s.image
    return [want[str(Path(d) / shard)][key] for d, shard, key in items]


def _img_tag(data: bytes) -> str:
    from d2s.schema import sniff_image_ext

    mime = {"jpg": "jpeg", "png": "png", "webp": "webp"}.get(sniff_image_ext(data) or "png", "png")
    return f'<img src="data:image/{mime};base64,{base64.b64encode(data).decode()}" height="160">'


def _write_html(
    path: Path, matches: list[dict], shards_dir: Path, evals: dict[str, EvalImages], max_pairs: int
) -> None:
    """Each matched pair side by side: training image (shard, key) | evaluation image (set, item)."""
    rows = []
    shown = matches[:max_pairs]
    if shown:
        train = _train_images([(str(shards_dir), m["shard"], m["key"]) for m in shown])
        wanted: dict[str, set[str]] = {}
        for m in shown:
            wanted.setdefault(m["benchmark"], set()).add(m["item"])
        eval_images = {name: evals[name].images(items) for name, items in wanted.items()}
        for m, timg in zip(shown, train):
            eimg = eval_images[m["benchmark"]][m["item"]]
            how = f"{m['method']} " + (f"{m['distance']} bits" if "distance" in m else f"cos {m['similarity']}")
            rows.append(
                f"<tr><td>{_img_tag(timg)}<br>{html.escape(m['shard'])} / {html.escape(m['key'])}</td>"
                f"<td>{_img_tag(eimg)}<br>{html.escape(m['benchmark'])} / {html.escape(m['item'])}</td>"
                f"<td>{html.escape(how)}</td></tr>"
            )
    body = "\n".join(rows) or "<tr><td colspan=3>no training image matches an evaluation image</td></tr>"
    if len(matches) > len(shown):
        body += f"<tr><td colspan=3>... and {len(matches) - len(shown)} more pair(s): contamination.json</td></tr>"
    atomic_write_text(
        path,
        "<!doctype html><meta charset=utf-8><title>contamination</title>"
        f"<h1>Training images found in evaluation sets ({len(matches)} pair(s))</h1>"
        "<table border=1 cellpadding=4><tr><th>training</th><th>evaluation</th><th>match</th></tr>"
        f"{body}</table>\n",
    )
