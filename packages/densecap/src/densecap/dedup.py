"""Corpus-wide deduplication over finished shards: ``densecap dedup`` and the ``densecap-dedup`` stage.

Two passes (``docs/corpus-integrity.md``):

1. **Signatures, one file per shard** (:class:`Signer`, a unit job any densecap executor runs:
   inline, a process pool, or Ray). For every sample of a complete shard: perceptual hashes of
   the image (``imagehash``: a 64-bit pHash of the whole image and, with ``crops``, of nine
   crops of 90 % of its side at a 3 x 3 grid of offsets, and the dHashes of the same ten) and
   a MinHash of each kept dense text's word shingles (the near-duplicate filter's vectorised
   code). Written atomically to ``<shards>/integrity/signatures/<shard>.<settings hash>.npz``
   with the shard's size: a rerun (after SIGKILL too) skips every shard whose file is current.
2. **Clusters and the index** (:func:`dedup`): image pairs within ``image_distance`` bits
   (whole vs whole; with ``crops`` also whole vs a crop within ``crop_distance`` whose dHashes
   agree within ``crop_dhash_distance``), text pairs found by ``datasketch``'s MinHash LSH at
   ``text_threshold``; pairs joined into clusters (union-find); the first member of a cluster by
   (directory, shard, key) is kept. ``<shards>/integrity/dedup.json`` is written atomically in
   every input directory (:mod:`d2s.integrity` reads it).

Image pairs are compared exhaustively (faiss's ``IndexBinaryFlat`` range search when faiss is
installed, else ``numpy.bitwise_count`` in blocks): O(n^2) popcounts in the driver (time per 100k
images: the docs' table); the signatures are the part that scales out on the executor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2s.atomic import atomic_write_bytes, atomic_write_json
from d2s.config import ConfigError, from_dict, to_dict
from d2s.integrity import DEDUP_FILE, INDEX_VERSION, CorpusError, integrity_dir
from d2s.schema import Sample, SampleError
from d2s.shards import completed_shards, iter_records

from .card import refresh_card
from .executors.base import EXECUTORS, ExecutorConfig, WorkerSpec
from .filters import minhash_seeds, minhash_signature, words
from .images import Unit

log = logging.getLogger(__name__)

SIGNATURE_DIR = "signatures"
SIGNATURE_VERSION = 2  # 2: the dHashes of the crop grid
# the scheme label datasketch 2.x asks for when a LeanMinHash is built from stored values; its LSH
# reads the values only (ours come from densecap.filters.minhash_signature)
MINHASH_SCHEME = "affine64"


@dataclass
class DedupParams:
    """What counts as a duplicate (all but ``text_sources`` and the thresholds decide the signatures)."""

    images: bool = True
    texts: bool = True
    # image pairs whose whole-image pHashes differ in at most this many of 64 bits: exact copies,
    # re-encodings and resizes (measured: all within 4 bits; docs/corpus-integrity.md)
    image_distance: int = 4
    # also compare each image with 9 crops (90 % of the side, 3 x 3 offsets) of every other: 10 % crops
    crops: bool = True
    crop_distance: int = 8  # pHash bits, whole image vs a crop of the other
    # ... and the dHashes of that whole image and that crop must agree too (a second, independent
    # hash: on the synthetic world's look-alikes it removes nearly every false crop match)
    crop_dhash_distance: int = 12
    shingle: int = 3  # words per shingle
    num_perm: int = 128  # MinHash permutations
    text_threshold: float = 0.7  # estimated Jaccard similarity of the shingle sets (MinHash LSH)
    text_sources: list[str] = field(default_factory=list)  # caption-source labels to compare ([] = all)

    def __post_init__(self) -> None:
        for name in ("image_distance", "crop_distance", "crop_dhash_distance"):
            if not 0 <= getattr(self, name) <= 64:
                raise ValueError(f"{name} must be in [0, 64] (bits of a 64-bit hash)")
        if not 0.0 < self.text_threshold <= 1.0:
            raise ValueError("text_threshold must be in (0, 1]")
        if self.shingle < 1 or self.num_perm < 16:
            raise ValueError("shingle must be >= 1 and num_perm >= 16")


@dataclass
class DedupConfig:
    """``densecap dedup``: input shard directories (any number of ranks' outputs), what counts as
    a duplicate, and who computes the signatures (any densecap executor)."""

    inputs: list[str] = field(default_factory=list)
    params: DedupParams = field(default_factory=DedupParams)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    num_workers: int = 1
    progress: bool = True


def signature_settings(p: DedupParams) -> dict[str, Any]:
    """The settings a signature file depends on (thresholds and source choice are applied later)."""
    return {
        "version": SIGNATURE_VERSION,
        "images": p.images,
        "crops": p.crops,
        "texts": p.texts,
        "shingle": p.shingle,
        "num_perm": p.num_perm,
        "text_hash": "splitmix64",  # densecap.filters.minhash_signature
    }


def signature_fingerprint(p: DedupParams) -> str:
    return hashlib.sha256(json.dumps(signature_settings(p), sort_keys=True).encode()).hexdigest()[:16]


def signature_path(shards_dir: str | Path, shard: str, fingerprint: str) -> Path:
    """``<shards>/integrity/signatures/<shard>.<settings hash>.npz``: runs with other settings (a
    contamination check without crops, say) keep their own files instead of replacing these."""
    return integrity_dir(shards_dir) / SIGNATURE_DIR / f"{Path(shard).name[: -len('.tar')]}.{fingerprint}.npz"


# ---- image and text signatures -----------------------------------------------------------
def _hash_int(h) -> int:
    return int(np.packbits(h.hash.ravel()).view(">u8")[0])


def crop_grid(im, fraction: float = 0.1, n: int = 3) -> list:
    """``n`` x ``n`` crops of ``1 - fraction`` of each side, at evenly spaced offsets."""
    w, h = im.size
    dx, dy = w * fraction, h * fraction
    out = []
    for i in range(n):
        for j in range(n):
            ox, oy = dx * i / (n - 1), dy * j / (n - 1)
            out.append(im.crop((round(ox), round(oy), round(ox + w - dx), round(oy + h - dy))))
    return out


#: hashes per image: the whole image's pHash; with crops also the 9 grid crops' pHashes, then the
#: dHashes of the whole image and of the same 9 crops (columns 10..19: the crop matches' check)
HASHES_WITH_CROPS = 20


def image_hashes(data: bytes, crops: bool) -> list[int]:
    """The 64-bit pHash of the image; with ``crops`` also the pHashes of its 9 grid crops, then the
    dHashes of the whole image and of the same crops (see :data:`HASHES_WITH_CROPS`). Raises what
    PIL raises."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        hashes = [_hash_int(imagehash.phash(im))]
        if crops:
            grid = crop_grid(im)
            hashes += [_hash_int(imagehash.phash(c)) for c in grid]
            hashes += [_hash_int(imagehash.dhash(x)) for x in [im, *grid]]
    return hashes


def shingles(text: str, k: int) -> set[bytes]:
    w = words(text)
    return {" ".join(w[i : i + k]).encode() for i in range(max(1, len(w) - k + 1))} or {b""}


def text_minhash(text: str, p: DedupParams) -> np.ndarray:
    """MinHash of the text's word shingles (``num_perm`` uint64 values): the near-duplicate filter's
    vectorised code (``densecap.filters.minhash_signature``), ~3x faster than datasketch's
    ``MinHash.update_batch`` at the same accuracy (benchmarks/corpus_integrity.py)."""
    return minhash_signature(text, p.shingle, _seeds(p.num_perm))


@functools.lru_cache(maxsize=4)
def _seeds(num_perm: int) -> np.ndarray:
    return minhash_seeds(num_perm)


class Signer:
    """The signature job (a densecap unit worker): one unit = one input shard -> one signature file."""

    def __init__(self, params: DedupParams):
        self.params = params
        self.fingerprint = signature_fingerprint(params)
        self.stats_extra: dict[str, Any] = {}

    fatal = ""

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def process(self, unit: Unit, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        shard = Path(unit.payload["shard"])
        out = signature_path(shard.parent, shard.name, self.fingerprint)
        if signature_current(out, unit.payload["bytes"], self.fingerprint):
            n = unit.size or 0
            if progress:
                progress(n)
            return {"shard": shard.name, "count": n, "skipped": True}
        t0 = time.perf_counter()
        keys, hashes, tkeys, tsources, tsigs = [], [], [], [], []
        for rec in iter_records([shard]):
            s = Sample.from_wds(rec, shard=shard.name)
            keys.append(s.key)
            if self.params.images:
                try:
                    hashes.append(image_hashes(s.image, self.params.crops))
                except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
                    raise SampleError(
                        f"unreadable image ({type(exc).__name__}: {exc})", shard=str(shard), key=s.key
                    ) from None
            if self.params.texts:
                for d in s.kept_dense():
                    tkeys.append(s.key)
                    tsources.append(d.source)
                    tsigs.append(text_minhash(d.text, self.params))
            if progress:
                progress(1)
        width = HASHES_WITH_CROPS if self.params.crops else 1
        buf = io.BytesIO()
        np.savez(
            buf,
            keys=np.array(keys, dtype=str),
            image_hashes=np.array(hashes, dtype=np.uint64).reshape(-1, width),
            text_keys=np.array(tkeys, dtype=str),
            text_sources=np.array(tsources, dtype=str),
            text_signatures=np.array(tsigs, dtype=np.uint64).reshape(-1, self.params.num_perm),
            meta=np.array(json.dumps({"bytes": unit.payload["bytes"], "fingerprint": self.fingerprint})),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, buf.getvalue())
        return {"shard": shard.name, "count": len(keys), "texts": len(tkeys), "seconds": time.perf_counter() - t0}


def signature_current(path: Path, shard_bytes: int, fingerprint: str) -> bool:
    """True when ``path`` holds the signatures of a shard of this size under these settings."""
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
    except Exception:  # noqa: BLE001 - a damaged file is simply redone
        return False
    return meta.get("bytes") == shard_bytes and meta.get("fingerprint") == fingerprint


def make_signer(config: dict[str, Any], out: Path) -> Signer:
    """``WorkerSpec.factory`` of the signature job: ``config`` is :class:`DedupParams` as plain data."""
    return Signer(from_dict(DedupParams, config, "params"))


# ---- the corpus ---------------------------------------------------------------------------
def corpus_units(inputs: list[str]) -> list[Unit]:
    """One unit per complete shard of every input directory; an error names what is missing."""
    if not inputs:
        raise CorpusError("inputs: no shard directory given")
    units: list[Unit] = []
    for d in inputs:
        if not Path(d).is_dir():
            raise CorpusError(f"inputs: {d} is not a directory")
        shards = completed_shards(d)
        if not shards:
            raise CorpusError(f"inputs: {d} holds no complete shard (<split>-NNNNNN.tar with its .stats.json)")
        for p, st in shards.items():
            units.append(Unit("sig", len(units), {"shard": p, "bytes": st["bytes"]}, st.get("count")))
    if not sum(u.size or 0 for u in units):
        raise CorpusError(f"inputs: the corpus is empty (the shards of {', '.join(inputs)} hold no sample)")
    return units


def compute_signatures(cfg: DedupConfig, units: list[Unit], what: str = "dedup") -> dict[str, Any]:
    """Every unit's signature file, on ``cfg.executor``; returns counts (written / skipped)."""
    from tqdm import tqdm

    work = integrity_dir(cfg.inputs[0])
    work.mkdir(parents=True, exist_ok=True)
    spec = WorkerSpec(
        factory="densecap.dedup:make_signer",
        config=to_dict(cfg.params),
        out=str(work),
        fingerprint=signature_fingerprint(cfg.params),
    )
    todo = [
        u
        for u in units
        if not signature_current(signature_path(*_split(u), spec.fingerprint), u.payload["bytes"], spec.fingerprint)
    ]
    results: list[dict] = []
    info: dict[str, Any] = {}
    total = sum(u.size or 0 for u in todo)
    with tqdm(total=total, desc=f"densecap {what}: signatures", unit="img", disable=not cfg.progress) as bar:
        fatal = EXECUTORS.get(cfg.executor.type)(spec, todo, cfg.executor, cfg.num_workers, results, bar.update, info)
    if fatal:
        raise RuntimeError(fatal)
    return {
        "shards": len(units),
        "signatures_written": sum(1 for r in results if not r.get("skipped")),
        "signatures_reused": len(units) - len(todo) + sum(1 for r in results if r.get("skipped")),
        **info,
    }


def _split(u: Unit) -> tuple[str, str]:
    p = Path(u.payload["shard"])
    return str(p.parent), p.name


@dataclass
class Signatures:
    """Every signature of the corpus, concatenated: ``items[i] = (dir, shard, key)``."""

    items: list[tuple[str, str, str]]
    image_hashes: np.ndarray  # (n, 1 or 10) uint64
    texts: list[tuple[str, str, str, str]]  # (dir, shard, key, source)
    text_signatures: np.ndarray  # (m, num_perm) uint64


def load_signatures(units: list[Unit], params: DedupParams) -> Signatures:
    items, hashes, texts, tsigs = [], [], [], []
    for u in units:
        d, name = _split(u)
        with np.load(signature_path(d, name, signature_fingerprint(params))) as z:
            items += [(d, name, str(k)) for k in z["keys"]]
            hashes.append(z["image_hashes"])
            texts += [(d, name, str(k), str(s)) for k, s in zip(z["text_keys"], z["text_sources"])]
            tsigs.append(z["text_signatures"])
    width = HASHES_WITH_CROPS if params.crops else 1
    return Signatures(
        items,
        np.concatenate(hashes) if hashes else np.zeros((0, width), np.uint64),
        texts,
        np.concatenate(tsigs) if tsigs else np.zeros((0, params.num_perm), np.uint64),
    )


def hamming_pairs(a: np.ndarray, b: np.ndarray, max_distance: int, same: bool, engine: str = "auto"):
    """(i, j, distance) with popcount(a[i] ^ b[j]) <= max_distance (i < j when ``same``), every
    pair (exhaustive). ``engine``: ``faiss`` (``IndexBinaryFlat.range_search``: SIMD popcounts on
    every core, ~8x numpy on one; the ``faiss`` extra), ``numpy``, or ``auto`` (faiss when installed)."""
    if engine == "auto":
        engine = "faiss" if importlib.util.find_spec("faiss") is not None else "numpy"
    if engine not in ("faiss", "numpy"):
        raise ValueError(f"engine: {engine!r} is not one of ['auto', 'faiss', 'numpy']")
    if not len(a) or not len(b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j, d = (_pairs_faiss if engine == "faiss" else _pairs_numpy)(a, b, max_distance)
    if same:
        keep = j > i
        i, j, d = i[keep], j[keep], d[keep]
    return i.astype(np.int64), j.astype(np.int64), d.astype(np.int64)


def _pairs_faiss(a: np.ndarray, b: np.ndarray, max_distance: int):
    import faiss

    def codes(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(np.uint64)).view(np.uint8).reshape(-1, 8)

    index = faiss.IndexBinaryFlat(64)
    index.add(codes(b))
    lims, d, j = index.range_search(codes(a), max_distance + 1)  # faiss keeps distances < radius
    i = np.repeat(np.arange(len(a)), np.diff(lims.astype(np.int64)))
    return i, j, d


def _pairs_numpy(a: np.ndarray, b: np.ndarray, max_distance: int):
    """In blocks of rows that keep the distance matrix under ~4M entries."""
    out_i, out_j, out_d = [], [], []
    block = max(1, 4_000_000 // len(b))
    for s in range(0, len(a), block):
        dist = np.bitwise_count(a[s : s + block, None] ^ b[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        out_i.append(ii + s)
        out_j.append(jj)
        out_d.append(dist[ii, jj])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def crop_matches(whole_p, whole_d, crops: np.ndarray, crop_distance: int, dhash_distance: int):
    """(i, j, pHash distance) where image i's whole pHash is within ``crop_distance`` bits of a grid
    crop of image j, and the dHashes of the same two (i's whole image, that crop of j) within
    ``dhash_distance``; ``crops`` is j's side of :func:`image_hashes` (columns 1..9 pHash, 11..19
    dHash). The closest crop per pair."""
    best: dict[tuple[int, int], int] = {}
    for c in range(1, 10):
        i, j, d = hamming_pairs(whole_p, crops[:, c], crop_distance, same=False)
        ok = np.bitwise_count(whole_d[i] ^ crops[j, 10 + c]) <= dhash_distance
        for a, b, dist in zip(i[ok].tolist(), j[ok].tolist(), d[ok].tolist()):
            if (a, b) not in best or dist < best[(a, b)]:
                best[(a, b)] = dist
    return best


def image_pairs(h: np.ndarray, p: DedupParams) -> dict[tuple[int, int], tuple[int, str]]:
    """(i, j) with i < j -> (distance, kind): 'phash' (whole images) or 'crop' (whole vs a crop)."""
    pairs: dict[tuple[int, int], tuple[int, str]] = {}
    if not len(h):
        return pairs
    whole = h[:, 0]
    for i, j, d in zip(*hamming_pairs(whole, whole, p.image_distance, same=True)):
        pairs[(int(i), int(j))] = (int(d), "phash")
    if p.crops and h.shape[1] == HASHES_WITH_CROPS:
        for (i, j), d in crop_matches(whole, h[:, 10], h, p.crop_distance, p.crop_dhash_distance).items():
            if i == j:
                continue
            key = (min(i, j), max(i, j))
            if key not in pairs:
                pairs[key] = (d, "crop")
            elif pairs[key][1] == "crop" and d < pairs[key][0]:
                pairs[key] = (d, "crop")
    return pairs


def text_pairs(sig: Signatures, p: DedupParams) -> dict[tuple[int, int], float]:
    """(i, j) with i < j -> estimated Jaccard similarity, for texts MinHash LSH puts together."""
    from datasketch import LeanMinHash, MinHashLSH

    use = [i for i, t in enumerate(sig.texts) if not p.text_sources or t[3] in p.text_sources]
    lsh = MinHashLSH(threshold=p.text_threshold, num_perm=p.num_perm)
    lean = {}
    for i in use:
        m = LeanMinHash(seed=1, hashvalues=sig.text_signatures[i], scheme=MINHASH_SCHEME)
        lean[i] = m
        lsh.insert(i, m, check_duplication=False)
    pairs: dict[tuple[int, int], float] = {}
    for i in use:
        for j in lsh.query(lean[i]):
            if j <= i or sig.texts[j][:3] == sig.texts[i][:3]:
                continue  # itself, or another caption of the same image
            sim = float(np.mean(sig.text_signatures[i] == sig.text_signatures[j]))
            if sim >= p.text_threshold:
                pairs[(i, j)] = sim
    return pairs


def clusters(n: int, pairs) -> np.ndarray:
    """Union-find over ``pairs``; returns each item's cluster root (the smallest index in it)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def _entries(rows, roots, best: dict[int, tuple[float, str]]) -> list[dict]:
    """Index entries of every member of a cluster of two or more: its cluster, verdict, the kept
    member (``of``), and the closest match it has (``score``: bits or similarity; ``kind``)."""
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        members.setdefault(int(r), []).append(i)
    out = []
    for cid, (root, ms) in enumerate(sorted((r, m) for r, m in members.items() if len(m) > 1)):
        for i in ms:
            d, shard, key = rows[i][:3]
            score, kind = best.get(i, (None, ""))
            out.append(
                {
                    "dir": d,
                    "shard": shard,
                    "key": key,
                    **({"source": rows[i][3]} if len(rows[i]) > 3 else {}),
                    "cluster": cid,
                    "verdict": "keep" if i == root else "duplicate",
                    "of": f"{rows[root][0]}:{rows[root][1]}/{rows[root][2]}",
                    "score": score,
                    "kind": kind,
                }
            )
    return out


def _closest(pairs: dict, smaller_is_closer: bool) -> dict[int, tuple[float, str]]:
    """item -> (score, kind) of its closest pair (images: fewest bits; texts: highest similarity)."""
    best: dict[int, tuple[float, str]] = {}
    for (i, j), v in pairs.items():
        score, kind = v if isinstance(v, tuple) else (v, "minhash")
        for a in (i, j):
            if a not in best or (score < best[a][0] if smaller_is_closer else score > best[a][0]):
                best[a] = (score, kind)
    return best


def dedup(cfg: DedupConfig) -> dict[str, Any]:
    """Signatures (resumable, on the executor), clusters, and ``integrity/dedup.json`` in every input."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, inputs=[str(Path(p)) for p in cfg.inputs])
    units = corpus_units(cfg.inputs)
    sig_counts = compute_signatures(cfg, units)
    t_sig = time.perf_counter() - t0
    sig = load_signatures(units, cfg.params)
    t1 = time.perf_counter()
    ipairs = image_pairs(sig.image_hashes, cfg.params) if cfg.params.images else {}
    iroots = clusters(len(sig.items), ipairs)
    t_img = time.perf_counter() - t1
    t2 = time.perf_counter()
    tpairs = text_pairs(sig, cfg.params) if cfg.params.texts else {}
    troots = clusters(len(sig.texts), tpairs)
    t_txt = time.perf_counter() - t2
    images = _entries(sig.items, iroots, _closest(ipairs, smaller_is_closer=True))
    texts = _entries(sig.texts, troots, _closest(tpairs, smaller_is_closer=False))
    counts = {
        "images": len(sig.items),
        "image_duplicates": sum(e["verdict"] == "duplicate" for e in images),
        "image_clusters": len({e["cluster"] for e in images}),
        "image_duplicates_by_kind": dict(Counter(e["kind"] for e in images if e["verdict"] == "duplicate")),
        "texts": len(sig.texts),
        "text_duplicates": sum(e["verdict"] == "duplicate" for e in texts),
        "text_clusters": len({e["cluster"] for e in texts}),
    }
    seconds = {
        "signatures": round(t_sig, 3),
        "image_pairs": round(t_img, 3),
        "text_pairs": round(t_txt, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    for d in cfg.inputs:
        doc = {
            "version": INDEX_VERSION,
            "inputs": [str(x) for x in cfg.inputs],
            "params": to_dict(cfg.params),
            "counts": counts,
            "shards": shard_sizes(units, d),
            "images": [_local(e) for e in images if e["dir"] == str(Path(d))],
            "texts": [_local(e) for e in texts if e["dir"] == str(Path(d))],
        }
        atomic_write_json(integrity_dir(d) / DEDUP_FILE, doc)
        refresh_card(d)  # a corpus with a data card keeps its counts current
    log.info("densecap dedup: %s", json.dumps(counts))
    return {**counts, **sig_counts, "seconds": seconds}


def shard_sizes(units: list[Unit], d: str) -> dict[str, int]:
    """name -> size of the shards of directory ``d`` the index is computed on (its staleness check)."""
    return {
        Path(u.payload["shard"]).name: u.payload["bytes"]
        for u in units
        if str(Path(u.payload["shard"]).parent) == str(Path(d))
    }


def _local(e: dict) -> dict:
    return {k: v for k, v in e.items() if k != "dir"}


def parse_dedup_config(doc: dict[str, Any]) -> DedupConfig:
    cfg = from_dict(DedupConfig, doc, "config")
    if not cfg.inputs:
        raise ConfigError("inputs: give at least one shard directory")
    cfg.inputs = [str(Path(p)) for p in cfg.inputs]
    return cfg
