"""Reading a shard directory for the page: members by key (tar headers indexed once per shard, a
member read by its offset), per-split summaries to filter and page through, charts.

Read only: shards are opened for reading and nothing is written next to them. A shard that
cannot be read, or a sample whose JSON breaks the schema, is named (shard and key) in the
answer instead of failing the page.
"""

from __future__ import annotations

import json
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2s.schema import IMAGE_EXTENSIONS, Sample, SampleError
from d2s.shards import read_manifest

from .config import Named, UIError

MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class Member:
    offset: int
    size: int


@dataclass
class Summary:
    """What filtering needs of one sample (the full record is read again when shown)."""

    key: str
    shard: str
    sparse: int = 0
    dense: list[dict[str, Any]] = field(default_factory=list)  # source, verdict, error, scores
    sentence_scores: list[float] = field(default_factory=list)
    problem: str = ""  # the record breaks the schema: shown instead of its content


class ShardDir:
    """One shard directory: its manifest, each shard's member index, records by key."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self._members: dict[str, dict[str, dict[str, Member]]] = {}
        self._summaries: dict[str, list[Summary]] = {}
        self._where: dict[str, dict[str, str]] = {}  # split -> key -> shard path
        self._lock = threading.Lock()

    # ---- layout ---------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        try:
            doc = read_manifest(self.path)
        except FileNotFoundError as exc:
            raise UIError(f"shards {self.name}: {exc}", 404) from None
        except ValueError as exc:
            raise UIError(f"shards {self.name}: {self.path / 'manifest.json'} is not valid JSON ({exc})", 422) from None
        if not isinstance(doc.get("splits"), dict):
            raise UIError(f"shards {self.name}: {self.path / 'manifest.json'} has no 'splits' object", 422)
        return doc

    def splits(self) -> dict[str, int]:
        return {k: int(v.get("count", 0)) for k, v in self.manifest()["splits"].items()}

    def shards(self, split: str) -> list[Path]:
        splits = self.manifest()["splits"]
        if split not in splits:
            raise UIError(f"shards {self.name}: no split {split!r}; splits: {sorted(splits)}", 404)
        return [self.path / n for n in splits[split]["shards"]]

    def members(self, shard: Path) -> dict[str, dict[str, Member]]:
        """key -> member suffix -> (offset, size), from the tar headers (read once)."""
        key = str(shard)
        with self._lock:
            if key in self._members:
                return self._members[key]
        out: dict[str, dict[str, Member]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    stem, _, suffix = m.name.rpartition("/")[2].partition(".")
                    out.setdefault(stem, {})[suffix] = Member(m.offset_data, m.size)
        except FileNotFoundError:
            raise UIError(f"shards {self.name}: shard {shard.name} is missing", 404) from None
        except (tarfile.TarError, OSError) as exc:
            raise UIError(f"shards {self.name}: shard {shard.name} cannot be read as a tar ({exc})", 422) from None
        with self._lock:
            self._members[key] = out
        return out

    @staticmethod
    def read(shard: Path, member: Member) -> bytes:
        with open(shard, "rb") as f:
            f.seek(member.offset)
            return f.read(member.size)

    def locate(self, split: str, key: str) -> tuple[Path, dict[str, Member]]:
        where = self._where.get(split)
        if where is None:
            where = {}
            for shard in self.shards(split):
                for k in self.members(shard):
                    where[k] = str(shard)
            self._where[split] = where
        if key not in where:
            raise UIError(f"shards {self.name}: no sample with key {key!r} in split {split!r}", 404)
        shard = Path(where[key])
        return shard, self.members(shard)[key]

    def image(self, split: str, key: str) -> tuple[bytes, str]:
        shard, members = self.locate(split, key)
        for ext in IMAGE_EXTENSIONS:
            if ext in members:
                return self.read(shard, members[ext]), MEDIA_TYPES[ext]
        raise UIError(f"shards {self.name}: shard {shard.name}, key {key!r}: no image member", 404)

    def sample(self, split: str, key: str) -> dict[str, Any]:
        """The whole record, checked against the schema, for the page."""
        shard, members = self.locate(split, key)
        if "json" not in members:
            raise UIError(f"shards {self.name}: shard {shard.name}, key {key!r}: no json member", 422)
        raw = self.read(shard, members["json"])
        try:
            s = Sample.from_wds({"__key__": key, **{k: b"-" for k in members}, "json": raw}, shard=shard.name)
        except SampleError as exc:
            raise UIError(f"shards {self.name}: {exc}", 422) from None
        return {
            "key": s.key,
            "id": s.id,
            "dataset": s.dataset,
            "split": s.split,
            "path": s.path,
            "shard": shard.name,
            "sparse": s.sparse,
            "dense": [
                {
                    "text": d.text,
                    "source": d.source,
                    "model": d.model,
                    "prompt": d.prompt,
                    "params": d.params,
                    "scores": d.scores,
                    "verdict": d.verdict,
                    "error": d.error,
                    "sentences": [vars(x) for x in d.sentences],
                    "scorer": d.scorer,
                    "original_text": d.original_text,
                }
                for d in s.dense
            ],
            "meta": {k: v for k, v in s.meta.items() if k != "scene"},
        }

    # ---- summaries ------------------------------------------------------------------
    def summaries(self, split: str) -> list[Summary]:
        shards = self.shards(split)  # every time: a manifest removed since is noticed
        if split in self._summaries:
            return self._summaries[split]
        out = []
        for shard in shards:
            members = self.members(shard)
            with open(shard, "rb") as f:
                for key, m in members.items():
                    out.append(_summary(key, shard.name, f, m))
        self._summaries[split] = out
        return out

    def query(self, split: str, f: CorpusFilter, page: int, size: int) -> dict[str, Any]:
        rows = [s for s in self.summaries(split) if f.matches(s)]
        page = max(page, 0)
        chosen = rows[page * size : (page + 1) * size]
        return {
            "total": len(rows),
            "page": page,
            "pages": max(1, -(-len(rows) // size)),
            "samples": [self._row(split, s) for s in chosen],
        }

    def _row(self, split: str, s: Summary) -> dict[str, Any]:
        if s.problem:
            return {"key": s.key, "shard": s.shard, "problem": s.problem}
        try:
            return self.sample(split, s.key)
        except UIError as exc:
            return {"key": s.key, "shard": s.shard, "problem": str(exc)}

    def stats(self, split: str, bins: int = 20) -> dict[str, Any]:
        """Captions per (source, verdict), a histogram of every filter score and of the sentence
        grounding scores: the report's figures, for the chosen split."""
        rows = self.summaries(split)
        verdicts: dict[str, dict[str, int]] = {}
        scores: dict[str, list[float]] = {}
        for s in rows:
            for d in s.dense:
                v = "error" if d["error"] else d["verdict"]
                verdicts.setdefault(d["source"], {}).setdefault(v, 0)
                verdicts[d["source"]][v] += 1
                for k, x in d["scores"].items():
                    scores.setdefault(k, []).append(float(x))
        sentences = [x for s in rows for x in s.sentence_scores]
        return {
            "images": len(rows),
            "problems": [{"key": s.key, "shard": s.shard, "problem": s.problem} for s in rows if s.problem][:20],
            "verdicts": verdicts,
            "scores": {k: histogram(v, bins) for k, v in sorted(scores.items())},
            "sentences": histogram(sentences, bins) if sentences else None,
        }


def histogram(values: list[float], bins: int) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if not len(a):
        return {"edges": [], "counts": [], "n": 0}
    lo, hi = float(a.min()), float(a.max())
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(), "n": int(len(a))}


def _summary(key: str, shard: str, f, members: dict[str, Member]) -> Summary:
    if "json" not in members:
        return Summary(key, shard, problem=f"shard {shard}, key {key!r}: no json member")
    f.seek(members["json"].offset)
    raw = f.read(members["json"].size)
    try:
        doc = json.loads(raw.decode("utf-8"))
        dense = doc["dense"]
        s = Summary(key, shard, sparse=len(doc["sparse"]))
        for d in dense:
            s.dense.append(
                {
                    "source": str(d["source"]),
                    "verdict": str(d.get("verdict", "keep")),
                    "error": str(d.get("error", "")),
                    "scores": {k: float(v) for k, v in (d.get("scores") or {}).items()},
                }
            )
            s.sentence_scores += [float(x["score"]) for x in d.get("sentences") or []]
        return s
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Summary(
            key, shard, problem=f"shard {shard}, key {key!r}: malformed json member ({type(exc).__name__}: {exc})"
        )


@dataclass
class CorpusFilter:
    """``verdict``: '' (any), 'keep', 'dropped' (any reason) or one reason; ``score`` with
    ``lo`` / ``hi``: some dense text's score in the range; ``key``: a substring of the key."""

    verdict: str = ""
    source: str = ""
    score: str = ""
    lo: float | None = None
    hi: float | None = None
    key: str = ""

    def matches(self, s: Summary) -> bool:
        if self.key and self.key not in s.key:
            return False
        if s.problem:
            return not (self.verdict or self.source or self.score)
        if not (self.verdict or self.source or self.score):
            return True
        return any(self._dense(d) for d in s.dense)

    def _dense(self, d: dict[str, Any]) -> bool:
        if self.source and d["source"] != self.source:
            return False
        v = "error" if d["error"] else d["verdict"]
        if self.verdict == "dropped":
            if v == "keep":
                return False
        elif self.verdict and v != self.verdict:
            return False
        if self.score:
            x = d["scores"].get(self.score)
            if x is None or (self.lo is not None and x < self.lo) or (self.hi is not None and x > self.hi):
                return False
        return True


class ImageFolder:
    """A folder of image files (``--images``), searchable like a split named ``images``; no
    captions, so nothing to browse on the corpus page. Keys are paths inside the folder."""

    SPLIT = "images"

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path.resolve()
        self._files: list[tuple[str, Path]] | None = None

    def files(self) -> list[tuple[str, Path]]:
        if self._files is None:
            if not self.path.is_dir():
                raise UIError(f"images {self.name}: {self.path} is not a directory", 404)
            out = []
            for p in sorted(self.path.rglob("*")):
                if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    out.append((p.relative_to(self.path).as_posix(), p))
            if not out:
                raise UIError(f"images {self.name}: no .jpg, .png or .webp file under {self.path}", 422)
            self._files = out
        return self._files

    def splits(self) -> dict[str, int]:
        return {self.SPLIT: len(self.files())}

    def shards(self, split: str) -> list[Path]:
        self._split(split)
        return [p for _, p in self.files()]

    def _split(self, split: str) -> None:
        if split != self.SPLIT:
            raise UIError(f"images {self.name}: a folder has one split, {self.SPLIT!r} (asked for {split!r})", 404)

    def image(self, split: str, key: str) -> tuple[bytes, str]:
        from .paths import Roots

        self._split(split)
        path = Roots([Named(self.name, self.path)]).resolve(self.name, key)
        ext = path.suffix.lower().lstrip(".")
        if ext not in MEDIA_TYPES:
            raise UIError(f"images {self.name}: {key!r} is not an image file", 403)
        return path.read_bytes(), MEDIA_TYPES[ext]

    def _no_corpus(self) -> UIError:
        return UIError(f"images {self.name}: a folder of images has no captions to browse; search it instead", 400)

    def query(self, split: str, f: CorpusFilter, page: int, size: int) -> dict[str, Any]:
        raise self._no_corpus()

    def stats(self, split: str, bins: int = 20) -> dict[str, Any]:
        raise self._no_corpus()
