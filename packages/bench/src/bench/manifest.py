"""The protocol manifest written with every result, and the check that two results are comparable.

A manifest says exactly what was measured: the benchmark and its protocol (subset, pairs,
captions per image, how texts are read, truncation, directions, which published table it
follows), the data (the SHA-256 of every annotation file read and of the evaluated content:
image ids, texts and the caption -> image mapping), the tie rule and ranking engine, and the
model (bundle path and SHA-256, its maximum text length). Two results are comparable when
their manifests agree on everything but ``model``; :func:`protocol_differences` lists the
fields where they do not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from d2s.retrieval import Protocol

MANIFEST_VERSION = 1
DIRECTIONS = ["image->text", "text->image"]
TRUNCATION = "texts cut at the model's maximum text length (tokens); see model.text_max_tokens"
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(paths: Iterable[str | Path], root: str | Path | None = None) -> dict[str, str]:
    """``{name: sha256}``; names relative to ``root`` when given (so moving a dataset keeps its manifest)."""
    out = {}
    for p in paths:
        p = Path(p)
        name = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else p.name
        out[name] = file_sha256(p)
    return dict(sorted(out.items()))


def dir_sha256(path: str | Path) -> str:
    """One digest of a directory's files (relative names and contents), e.g. a model bundle."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def content_sha256(image_ids: list[str], texts: list[str], txt_to_img: Any) -> str:
    """The evaluated content itself: which images, which texts, which text belongs to which image."""
    doc = [list(map(str, image_ids)), list(texts), np.asarray(txt_to_img, np.int64).tolist()]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()


def captions_per_image(txt_to_img: Any, n_images: int) -> str:
    counts = np.bincount(np.asarray(txt_to_img, np.int64), minlength=n_images)
    lo, hi = int(counts.min()), int(counts.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def build_manifest(
    benchmark: str,
    protocol: Protocol,
    *,
    n_images: int,
    n_texts: int,
    per_image: str,
    data: dict[str, Any],
    model: dict[str, Any],
    ties: str,
    engine: str,
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "benchmark": benchmark,
        "protocol": {
            "name": protocol.name,
            "description": protocol.description,
            "subset": protocol.subset or "all given images",
            "required_images": protocol.n_images,
            "folds": protocol.n_folds,
            "pairs": {"images": n_images, "texts": n_texts, "captions_per_image": per_image},
            "texts": protocol.texts or "as given",
            "truncation": TRUNCATION,
            "directions": DIRECTIONS,
            "reproduces": protocol.reproduces or None,
        },
        "data": data,
        "ties": ties,
        "engine": engine,
        "model": model,
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def protocol_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fields (dotted paths) where two manifests disagree on what was measured; ``model`` and
    ``data.source`` (where the files lay) are not part of the protocol."""
    fa = {k: v for k, v in _flatten(a).items() if not k.startswith("model") and k != "data.source"}
    fb = {k: v for k, v in _flatten(b).items() if not k.startswith("model") and k != "data.source"}
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: {va!r} vs {vb!r}")
    return out
