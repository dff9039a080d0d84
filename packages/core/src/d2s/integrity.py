"""The corpus-integrity index beside a shard directory, and how readers honour it.

densecap writes it (``densecap dedup``, ``densecap contamination``; ``docs/corpus-integrity.md``);
training, bench and densecap's report read it here, so none of them imports densecap::

    <shards>/integrity/dedup.json          corpus-wide duplicates (images and dense texts), with clusters
    <shards>/integrity/contamination.json  training images that match an evaluation set
    <shards>/integrity/signatures/         per-shard signatures (densecap's cache; readers ignore it)

``dedup.json`` lists every member of every duplicate cluster (an item in no cluster is unique)::

    {"version": 1, "params": {...}, "counts": {...}, "shards": {"train-000000.tar": 123456, ...},
     "images": [{"shard": "train-000001.tar", "key": "k", "cluster": 3, "verdict": "duplicate",
                 "of": "<dir>:train-000000.tar/k0", "distance": 4, "kind": "phash"}, ...],
     "texts":  [{"shard": ..., "key": ..., "source": "oracle", "cluster": 7, "verdict": "keep", ...}, ...]}

The first member of a cluster (by directory, shard, key) is kept (``verdict: keep``); the others
are ``duplicate``. ``shards`` holds the size of every shard the index was computed on: when one
has changed since (a new densecap run rewrote it), readers ignore the index and warn. Readers skip a duplicate image's whole sample and treat a duplicate dense text
as dropped (verdict :data:`TEXT_VERDICT`). The shards themselves are never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import Sample

log = logging.getLogger(__name__)

INTEGRITY_DIR = "integrity"
DEDUP_FILE = "dedup.json"
CONTAMINATION_FILE = "contamination.json"
INDEX_VERSION = 1
#: the verdict a dense text gets in memory when the dedup index names it a duplicate
TEXT_VERDICT = "corpus_duplicate"


class CorpusError(ValueError):
    """A corpus that cannot be deduplicated, checked or described (no shards, an unreadable image,
    an evaluation set that does not exist); the message names it."""


class IntegrityIndexError(ValueError):
    """An integrity index that cannot be read; the message names the file."""


def integrity_dir(shards_dir: str | os.PathLike) -> Path:
    return Path(shards_dir) / INTEGRITY_DIR


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityIndexError(f"{path}: not JSON ({exc}); rerun the command that wrote it") from None
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
        raise IntegrityIndexError(
            f"{path}: unknown index version {doc.get('version') if isinstance(doc, dict) else doc!r}"
        )
    return doc


@dataclass
class Integrity:
    """What the index of one shard directory says: duplicates to skip and contaminated images."""

    #: (shard file name, key) -> the dedup entry of an image that is a duplicate
    duplicate_images: dict[tuple[str, str], dict] = field(default_factory=dict)
    #: (shard file name, key, caption source) of the dense texts that are duplicates
    duplicate_texts: set[tuple[str, str, str]] = field(default_factory=set)
    #: (shard file name, key) -> the contamination matches of a training image
    contaminated: dict[tuple[str, str], list[dict]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.duplicate_images or self.duplicate_texts or self.contaminated)

    def is_duplicate(self, shard: str, key: str) -> bool:
        return (Path(shard).name, key) in self.duplicate_images

    def apply(self, sample: Sample, shard: str | None) -> Sample | None:
        """None when the sample's image is a duplicate; else the sample with its duplicate dense
        texts marked dropped (verdict :data:`TEXT_VERDICT`; the shard on disk is unchanged)."""
        if shard is None:
            return sample
        name = Path(shard).name
        if (name, sample.key) in self.duplicate_images:
            return None
        if self.duplicate_texts:
            for d in sample.dense:
                if d.verdict == "keep" and (name, sample.key, d.source) in self.duplicate_texts:
                    d.verdict = TEXT_VERDICT
        return sample

    def summary(self) -> str:
        return (
            f"{len(self.duplicate_images)} duplicate image(s) skipped, {len(self.duplicate_texts)} duplicate dense "
            f"text(s) dropped, {len(self.contaminated)} image(s) flagged as in an evaluation set"
        )


def stale_shards(doc: dict[str, Any], shards_dir: str | os.PathLike) -> list[str]:
    """The shards an index was computed on (its ``shards``: name -> size) that are no longer there
    with that size: rewritten (e.g. captioned again) or removed since. Empty: the index is current."""
    from .shards import completed_shards

    now = {Path(p).name: st.get("bytes") for p, st in completed_shards(shards_dir).items()}
    return sorted(name for name, size in (doc.get("shards") or {}).items() if now.get(name) != size)


def _current(doc: dict[str, Any] | None, shards_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """``doc`` when it describes the shards as they are; else None, with a warning saying what to rerun."""
    if doc is None:
        return None
    stale = stale_shards(doc, shards_dir)
    if stale:
        log.warning(
            "%s/%s/%s is stale: %d shard(s) changed or vanished since it was written (%s%s); it is ignored. "
            "Rerun `densecap %s %s` to bring it up to date.",
            shards_dir,
            INTEGRITY_DIR,
            name,
            len(stale),
            ", ".join(stale[:3]),
            " ..." if len(stale) > 3 else "",
            name.split(".")[0],
            shards_dir,
        )
        return None
    return doc


def read_integrity(shards_dir: str | os.PathLike) -> Integrity:
    """The index of ``shards_dir`` (empty when there is none). An index file written for shards that
    have changed since (another densecap run rewrote them) is ignored, with a warning."""
    d = integrity_dir(shards_dir)
    out = Integrity()
    dedup = _current(_read(d / DEDUP_FILE), shards_dir, DEDUP_FILE)
    if dedup is not None:
        for e in dedup.get("images", []):
            if e.get("verdict") == "duplicate":
                out.duplicate_images[(e["shard"], e["key"])] = e
        for e in dedup.get("texts", []):
            if e.get("verdict") == "duplicate":
                out.duplicate_texts.add((e["shard"], e["key"], e["source"]))
    cont = _current(_read(d / CONTAMINATION_FILE), shards_dir, CONTAMINATION_FILE)
    if cont is not None:
        for m in cont.get("matches", []):
            out.contaminated.setdefault((m["shard"], m["key"]), []).append(m)
    return out


def read_dedup(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    return _read(integrity_dir(shards_dir) / DEDUP_FILE)


def read_contamination(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    return _read(integrity_dir(shards_dir) / CONTAMINATION_FILE)
