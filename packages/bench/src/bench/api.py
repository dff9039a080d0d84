"""The Python API: embed an evaluation set, evaluate protocols, write / read result files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from typing import Protocol as TypingProtocol

import numpy as np
import torch

from d2s.atomic import atomic_write_json, atomic_write_text
from d2s.retrieval import (
    DEFAULT_CHUNK_SIZE,
    ProtocolResult,
    RetrievalInputError,
    check_mapping,
    evaluate_protocol,
    get_protocol,
)

from .data import EvalSet
from .intervals import INTERVAL_METRICS, BootstrapSettings, QueryRanks, bootstrap_intervals
from .manifest import build_manifest, captions_per_image, content_sha256, dir_sha256, file_sha256

log = logging.getLogger(__name__)

RESULTS_FORMAT = "d2s-bench-retrieval"
RESULTS_VERSION = 2  # 2: per benchmark a protocol manifest, bootstrap intervals and every query's rank


class Encoder(TypingProtocol):
    """What bench needs from a model: ``vse.bundle.Bundle`` has exactly this."""

    def embed_images(self, images: list, batch_size: int = 64) -> torch.Tensor: ...
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor: ...


@dataclass
class RetrievalSettings:
    """How to evaluate (typed; the CLI and the stage both build one)."""

    protocols: list[str] = field(default_factory=lambda: ["custom"])
    long_text: bool = True  # also image <-> long text, where the data has long texts
    chunk_size: int = DEFAULT_CHUNK_SIZE
    ties: Literal["stable", "optimistic", "pessimistic"] = "stable"
    engine: Literal["exact", "faiss"] = "exact"
    faiss_k: int = 100
    image_batch_size: int = 64
    text_batch_size: int = 256
    device: str | None = None
    bootstrap: int = 1000  # replicates of the bootstrap intervals (0: no intervals)
    bootstrap_seed: int = 0
    interval_level: float = 0.95

    def __post_init__(self) -> None:
        for p in self.protocols:
            get_protocol(p)
        if "long_text" in self.protocols:
            raise RetrievalInputError("protocols: 'long_text' is chosen with long_text=true, not in the sparse list")
        if self.chunk_size < 1 or self.image_batch_size < 1 or self.text_batch_size < 1 or self.faiss_k < 1:
            raise RetrievalInputError("chunk_size, batch sizes and faiss_k must be >= 1")
        if self.bootstrap < 0:
            raise RetrievalInputError(f"bootstrap: replicates must be >= 0 (0: no intervals), got {self.bootstrap}")
        if self.bootstrap:
            self.bootstrap_settings()  # checks interval_level

    def bootstrap_settings(self) -> BootstrapSettings:
        return BootstrapSettings(self.bootstrap, self.bootstrap_seed, self.interval_level)


@dataclass
class BenchmarkResult(ProtocolResult):
    """One benchmark's result as bench writes it: the protocol's metrics, plus the protocol
    manifest, the bootstrap intervals (``{metric: [low, high]}``, with the settings that drew
    them) and every query's rank (what a later paired comparison resamples)."""

    intervals: dict[str, list[float]] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    query_ranks: QueryRanks | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(intervals=self.intervals, bootstrap=self.bootstrap, manifest=self.manifest)
        if self.query_ranks is not None:
            d["ranks"] = self.query_ranks.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkResult:
        base = ProtocolResult.from_dict(d)
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(ProtocolResult)},
            intervals={k: [float(x) for x in v] for k, v in d.get("intervals", {}).items()},
            bootstrap=d.get("bootstrap", {}),
            manifest=d.get("manifest", {}),
            query_ranks=QueryRanks.from_dict(d["ranks"]) if "ranks" in d else None,
        )


@dataclass
class Embeddings:
    """Image and text embeddings plus the caption -> image mapping (and optional long texts)."""

    img: torch.Tensor
    txt: torch.Tensor
    txt_to_img: torch.Tensor
    dense: torch.Tensor | None = None
    dense_img: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.txt_to_img = check_mapping(self.txt_to_img, self.img.shape[0], self.txt.shape[0])
        if (self.dense is None) != (self.dense_img is None):
            raise RetrievalInputError("dense and dense_img come together")
        if self.dense is not None:
            if self.dense_img.shape[0] != self.dense.shape[0]:
                raise RetrievalInputError(
                    f"{self.dense.shape[0]} dense texts but {self.dense_img.shape[0]} dense_img entries"
                )
            if self.dense_img.numel() != torch.unique(self.dense_img).numel():
                raise RetrievalInputError("dense_img: one long text per image (an image index repeats)")


# ------------------------------------------------------------------------ files of embeddings
def _read_array(path: Path, key: str | None = None) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".json":
        return np.asarray(json.loads(path.read_text()), dtype=np.int64)
    if suffix in (".txt", ".csv"):
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        d = load_file(str(path))
        if key is None:
            if len(d) != 1:
                raise RetrievalInputError(f"{path}: holds {sorted(d)}; say which tensor (file.safetensors:KEY)")
            return next(iter(d.values()))
        if key not in d:
            raise RetrievalInputError(f"{path}: no tensor {key!r}; tensors: {sorted(d)}")
        return d[key]
    raise RetrievalInputError(f"{path}: unsupported file type {suffix!r} (.npy, .safetensors, .json, .txt)")


def _split_key(spec: str | Path) -> tuple[Path, str | None]:
    s = str(spec)
    if ".safetensors:" in s:
        p, k = s.rsplit(":", 1)
        return Path(p), k
    return Path(s), None


def load_embeddings(
    path: str | Path | None = None,
    *,
    img: str | Path | None = None,
    txt: str | Path | None = None,
    txt_to_img: str | Path | None = None,
) -> Embeddings:
    """Either one safetensors file with ``img``, ``txt`` (and ``txt_to_img``, ``dense``,
    ``dense_img``) tensors, as :func:`save_embeddings` writes, or separate files
    (``.npy`` / ``.safetensors[:KEY]``; mapping also ``.json`` list or ``.txt``)."""
    if path is not None:
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        d = load_file(str(path))
        missing = [k for k in ("img", "txt") if k not in d]
        if missing:
            raise RetrievalInputError(f"{path}: lacks tensor(s) {missing}; tensors: {sorted(d)}")
        t = {k: torch.from_numpy(v) for k, v in d.items()}
        return Embeddings(t["img"], t["txt"], t.get("txt_to_img"), t.get("dense"), t.get("dense_img"))
    if img is None or txt is None:
        raise RetrievalInputError("give an embeddings file, or both img and txt embedding files")
    a = torch.from_numpy(np.ascontiguousarray(_read_array(*_split_key(img))))
    b = torch.from_numpy(np.ascontiguousarray(_read_array(*_split_key(txt))))
    m = None if txt_to_img is None else torch.from_numpy(_read_array(*_split_key(txt_to_img)).astype(np.int64))
    return Embeddings(a, b, m)


def save_embeddings(emb: Embeddings, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {"img": emb.img.contiguous(), "txt": emb.txt.contiguous(), "txt_to_img": emb.txt_to_img.contiguous()}
    if emb.dense is not None:
        d["dense"], d["dense_img"] = emb.dense.contiguous(), emb.dense_img.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in d.items()}, str(tmp))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------ model side
def load_encoder(bundle: str | Path, device: str | None = None) -> Encoder:
    """A trained model through its bundle (``vse.bundle.load_bundle``); vse is imported lazily."""
    try:
        from vse.bundle import load_bundle
    except ImportError as exc:
        raise RetrievalInputError(f"evaluating a model bundle needs the vse package ({exc})") from None
    return load_bundle(bundle) if device is None else load_bundle(bundle, device=device)


def _read_images(items: Sequence[bytes | str]) -> list[bytes]:
    return [Path(x).read_bytes() if isinstance(x, str) else x for x in items]


def _undecodable(images: Sequence[bytes]) -> tuple[int, str] | None:
    """The first image that PIL cannot decode, with the reason (looked for after an encoder failed)."""
    import io

    from PIL import Image

    for j, b in enumerate(images):
        try:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any failure to decode names the image
            return j, f"{type(exc).__name__}: {exc}"
    return None


def _embed_chunk(encoder: Encoder, data: EvalSet, start: int, images: list[bytes], batch_size: int) -> torch.Tensor:
    """``encoder.embed_images`` on images ``start..``; an image that cannot be decoded fails naming
    shard and key (shard sets) or the image file (Karpathy sets)."""
    from d2s.schema import SampleError

    try:
        return encoder.embed_images(images, batch_size=batch_size)
    except Exception as exc:
        bad = _undecodable(images)
        if bad is None:
            raise
        j = start + bad[0]
        src = data.images[j]
        where = f"image file {src}: " if isinstance(src, str) else ""
        shard = data.image_shards[j] if j < len(data.image_shards) else None
        raise SampleError(
            f"{where}cannot decode the image ({bad[1]}) [{data.name}]", shard=shard, key=data.image_ids[j]
        ) from exc


def embed_eval_set(encoder: Encoder, data: EvalSet, settings: RetrievalSettings | None = None) -> Embeddings:
    """Encode images (reading files batch by batch), captions and long texts."""
    from tqdm import tqdm

    s = settings or RetrievalSettings()
    step = max(s.image_batch_size, 1) * 8
    chunks = []
    for i in tqdm(range(0, len(data.images), step), desc="embed images", unit="batch"):
        chunks.append(_embed_chunk(encoder, data, i, _read_images(data.images[i : i + step]), s.image_batch_size))
    img = torch.cat(chunks).float()
    txt = encoder.embed_texts(list(data.captions), batch_size=s.text_batch_size).float()
    dense = dense_img = None
    if s.long_text and data.dense:
        dense = encoder.embed_texts(list(data.dense), batch_size=s.text_batch_size).float()
        dense_img = torch.as_tensor(data.dense_img, dtype=torch.long)
    return Embeddings(img, txt, torch.as_tensor(data.txt_to_img, dtype=torch.long), dense, dense_img)


def model_info(bundle: str | Path, encoder: Any = None) -> dict[str, Any]:
    """The model part of a manifest: bundle path, SHA-256 of its files, maximum text length."""
    info: dict[str, Any] = {"kind": "bundle", "path": str(bundle), "sha256": dir_sha256(bundle)}
    info["text_max_tokens"] = getattr(encoder, "text_max_length", None)
    return info


def embeddings_info(paths: dict[str, str]) -> dict[str, Any]:
    """The model part of a manifest for saved embeddings: each file's SHA-256."""
    return {"kind": "embeddings", "files": {k: file_sha256(_split_key(v)[0]) for k, v in paths.items()}}


def _data_info(data: EvalSet | None, emb: Embeddings, long_text: bool) -> dict[str, Any]:
    """The data part of a manifest: where the files lay, their hashes, and the evaluated content's hash."""
    if data is None:
        n = emb.img.shape[0]
        ids = [str(i) for i in range(n)]
        if long_text:
            return {"source": "saved embeddings", "content_sha256": content_sha256(ids, [], emb.dense_img)}
        return {"source": "saved embeddings", "content_sha256": content_sha256(ids, [], emb.txt_to_img)}
    info = dict(data.provenance)
    texts = list(data.dense) if long_text else list(data.captions)
    if long_text:
        info["texts"] = "the first kept dense text of each sample that has one"
        info["content_sha256"] = content_sha256(data.image_ids, texts, data.dense_img)
    else:
        info["content_sha256"] = content_sha256(data.image_ids, texts, data.txt_to_img)
    # duplicates tie with their twin; the tie rule decides how they count
    images = data.images if not long_text else [data.images[i] for i in data.dense_img]
    keys = [x if isinstance(x, str) else hashlib.sha256(x).hexdigest() for x in images]
    info["duplicates"] = {"texts": len(texts) - len(set(texts)), "images": len(keys) - len(set(keys))}
    return info


def _finish(
    name: str, r: ProtocolResult, s: RetrievalSettings, data: dict[str, Any], model: dict[str, Any]
) -> BenchmarkResult:
    engine = "exact" if s.engine == "exact" else f"faiss (ranks censored at {s.faiss_k})"
    ranks = QueryRanks(r.ranks.i2t, r.ranks.t2i, r.txt_to_img, r.n_folds)
    out = BenchmarkResult(
        **{f.name: getattr(r, f.name) for f in fields(ProtocolResult)},
        manifest=build_manifest(
            name,
            get_protocol(r.protocol),
            n_images=r.n_images,
            n_texts=r.n_texts,
            per_image=captions_per_image(r.txt_to_img, r.n_images),
            data=data,
            model=model,
            ties=s.ties,
            engine=engine,
        ),
        query_ranks=ranks,
    )
    if s.bootstrap:
        b = s.bootstrap_settings()
        out.intervals = bootstrap_intervals(ranks, b)
        out.bootstrap = b.to_dict()
    return out


def evaluate_embeddings(
    emb: Embeddings,
    settings: RetrievalSettings | None = None,
    *,
    data: EvalSet | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, BenchmarkResult]:
    """Every requested protocol on the captions, plus long-text retrieval where there are long
    texts; each with its manifest (``data``: the set embedded, for its files and content hash;
    ``model``: :func:`model_info` / :func:`embeddings_info`) and bootstrap intervals."""
    s = settings or RetrievalSettings()
    model = model or {"kind": "unknown"}
    kw = dict(chunk_size=s.chunk_size, ties=s.ties, device=s.device, engine=s.engine, faiss_k=s.faiss_k)
    out: dict[str, BenchmarkResult] = {}
    for p in s.protocols:
        t0 = time.perf_counter()
        r = evaluate_protocol(p, emb.img, emb.txt, emb.txt_to_img, **kw)
        out[p] = _finish(p, r, s, _data_info(data, emb, False), model)
        log.info("%s: rsum %.2f (%.2fs)", p, out[p].metrics.rsum, time.perf_counter() - t0)
    if s.long_text:
        if emb.dense is None:
            log.info("no long texts in this data: long-text retrieval skipped")
        else:
            sub = emb.img[emb.dense_img]
            r = evaluate_protocol("long_text", sub, emb.dense, None, **kw)
            out["long_text"] = _finish("long_text", r, s, _data_info(data, emb, True), model)
            log.info("long_text: rsum %.2f", out["long_text"].metrics.rsum)
    return out


# ------------------------------------------------------------------------ result files
@dataclass
class BenchResults:
    name: str
    benchmarks: dict[str, BenchmarkResult]
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "name": self.name,
            "created": self.created,
            "seconds": round(self.seconds, 3),
            "source": self.source,
            "settings": self.settings,
            "benchmarks": {k: v.to_dict() for k, v in self.benchmarks.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "results") -> BenchResults:
        if d.get("format") != RESULTS_FORMAT:
            raise RetrievalInputError(f"{where}: not a bench results file (format {d.get('format')!r})")
        if d.get("version") != RESULTS_VERSION:
            raise RetrievalInputError(
                f"{where}: results version {d.get('version')!r}, this bench reads version {RESULTS_VERSION} "
                "(with protocol manifests and intervals): evaluate again"
            )
        try:
            return cls(
                name=d["name"],
                benchmarks={k: BenchmarkResult.from_dict(v) for k, v in d["benchmarks"].items()},
                source=d.get("source", {}),
                settings=d.get("settings", {}),
                seconds=float(d.get("seconds", 0.0)),
                created=d.get("created", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RetrievalInputError(f"{where}: malformed results ({exc!r})") from None


COLUMNS = [
    ("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"),
    ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"),
    ("rsum", "rSum"), ("i2t_medr", "i2t medr"), ("i2t_meanr", "meanr"), ("t2i_medr", "t2i medr"), ("t2i_meanr", "meanr"),
]  # fmt: skip


def markdown_table(results: BenchResults) -> str:
    head = ["benchmark", "images", "texts"] + [c[1] for c in COLUMNS]
    lines = [f"# Retrieval: {results.name}", ""]
    if results.source:
        lines += [", ".join(f"{k}: `{v}`" for k, v in results.source.items()), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.benchmarks.items():
        m = r.metrics.to_dict()
        cells = [name, str(r.n_images), str(r.n_texts)] + [
            f"{m[k]:.2f}" if k != "rsum" else f"**{m[k]:.2f}**" for k, _ in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Recalls in %, ranks 1-based; ties: {results.settings.get('ties', 'stable')}. "
        "coco_1k_5fold averages five sequential 1K folds.",
    ]
    lines += interval_table(results)
    return "\n".join(lines) + "\n"


def fmt_interval(iv: list[float] | None) -> str:
    return "n/a" if not iv else f"[{iv[0]:.2f}, {iv[1]:.2f}]"


def interval_table(results: BenchResults) -> list[str]:
    """The bootstrap intervals of each benchmark, one row each (empty when none were drawn)."""
    rows = [(n, r) for n, r in results.benchmarks.items() if r.intervals]
    if not rows:
        return []
    b = rows[0][1].bootstrap
    head = ["benchmark"] + [dict(COLUMNS)[m] for m in INTERVAL_METRICS]
    lines = [
        "",
        f"## {100 * b.get('level', 0.95):g}% bootstrap intervals",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in rows:
        lines.append("| " + " | ".join([name] + [fmt_interval(r.intervals.get(m)) for m in INTERVAL_METRICS]) + " |")
    lines += [
        "",
        f"{b.get('method', 'bootstrap')}; {b.get('replicates')} replicates, seed {b.get('seed')}. "
        "Each benchmark's protocol manifest is in results.json.",
    ]
    return lines


def write_results(results: BenchResults, out_dir: str | Path) -> tuple[Path, Path]:
    """``results.json`` (named fields) and ``results.md``, written atomically into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", markdown_table(results))
    atomic_write_json(out / "results.json", results.to_dict())  # last: the completion marker
    return out / "results.json", out / "results.md"


def read_results(path: str | Path) -> BenchResults:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such results file") from None
    except json.JSONDecodeError as exc:
        raise RetrievalInputError(f"{p}: not JSON ({exc})") from None
    return BenchResults.from_dict(d, str(p))


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
