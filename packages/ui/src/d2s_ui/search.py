"""Search with a model: a sentence against a split's images, an image against its texts.

A split is embedded once per model (``bench.api.embed_eval_set`` on ``bench.data.load_shards``,
as ``bench retrieval`` embeds it) and cached in the cache directory (never next to the data):

    <cache_dir>/<key>.json          image keys, their shards, the texts and their images
    <cache_dir>/<key>.safetensors   img, txt, txt_to_img (+ dense, dense_img): written last,
                                    through a temporary name

``key`` is a sha256 of the model's identity (a bundle's resolved path, its config and the size
and modification time of its weights; an HF model's ``identity``) and of the split's shards
(names, sizes, modification times), so a retrained bundle or a rewritten shard embeds again. A
folder of images (``--images``) is embedded the same way, its image files standing for shards.
Top-k is exact (a matrix product) below ``faiss_min_images`` and a FAISS flat inner-product
index from there on (``engine``), the index ``d2s.retrieval.faiss_ranks`` uses for bench.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2s.atomic import atomic_write_bytes, atomic_write_json

from .config import UIConfig, UIError
from .corpus import ImageFolder

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class Embedded:
    """A split under one model: embeddings with the keys and texts they belong to.

    ``txt`` and ``dense`` may come from a loader, read from the cache file on first use: a
    sentence -> image search needs the image embeddings only, so the first results of a new app
    wait for those alone."""

    def __init__(
        self,
        img: np.ndarray,  # (N, D) float32, L2-normalised
        txt_to_img: np.ndarray,
        dense_img: np.ndarray,
        keys: list[str],
        captions: list[str],
        dense_texts: list[str],
        *,
        txt: np.ndarray | None = None,  # (T, D) sparse captions
        dense: np.ndarray | None = None,  # (M, D) kept dense texts (may be empty)
        loader=None,  # () -> (txt, dense), when they are not given
        cached: bool = False,
    ):
        self.img, self.txt_to_img, self.dense_img = img, txt_to_img, dense_img
        self.keys, self.captions, self.dense_texts = keys, captions, dense_texts
        self._txt, self._dense, self._loader = txt, dense, loader
        self.cached = cached
        self._faiss = None
        self._lock = threading.Lock()

    def _texts(self) -> None:
        with self._lock:
            if self._txt is None:
                self._txt, self._dense = self._loader()

    @property
    def txt(self) -> np.ndarray:
        self._texts()
        return self._txt

    @property
    def dense(self) -> np.ndarray:
        self._texts()
        return self._dense

    def top_images(self, q: np.ndarray, k: int, engine: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the ``k`` images closest to ``q`` (D,), best first."""
        k = min(k, len(self.keys))
        if engine == "faiss":
            if self._faiss is None:
                self._faiss = faiss_index(self.img)
            scores, idx = self._faiss.search(np.ascontiguousarray(q[None, :], dtype=np.float32), k)
            return idx[0], scores[0]
        return top_k(self.img, q, k)


def top_k(matrix: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, best first (equal scores within the k in index order)."""
    sims = torch.from_numpy(matrix) @ torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    k = min(k, sims.shape[0])
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    vals, idx = torch.topk(sims, k)
    order = np.lexsort((idx.numpy(), -vals.numpy()))
    return idx.numpy()[order], vals.numpy()[order]


def faiss_index(x: np.ndarray):
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise UIError("engine 'faiss' needs faiss-cpu (pip install faiss-cpu, or d2s-ui[faiss])", 500) from None
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


# ---------------------------------------------------------------------------- models
class Model:
    """A bundle (``vse.bundle``) or an HF dual encoder (``vse.scoring``), loaded on first use."""

    def __init__(self, name: str, kind: str, path: str):
        self.name, self.kind, self.path = name, kind, path
        self._encoder = None
        self._lock = threading.Lock()

    def identity(self) -> str:
        if self.kind == "bundle":
            p = Path(self.path)
            try:
                weights = (p / "model.safetensors").stat()
                config = (p / "vse_config.json").read_bytes()
            except OSError as exc:
                raise UIError(f"model {self.name}: {self.path} is not a readable bundle ({exc})", 422) from None
            return json.dumps(
                [str(p.resolve()), hashlib.sha256(config).hexdigest(), weights.st_size, weights.st_mtime_ns]
            )
        return self.encoder().identity

    def encoder(self):
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load()
            return self._encoder

    def _load(self):
        t0 = time.perf_counter()
        try:
            if self.kind == "bundle":
                from vse.bundle import load_bundle

                enc = load_bundle(self.path)
            else:
                from vse.scoring import HFDualEncoderScorer

                enc = HFDualEncoderScorer({"model": self.path, "progress": False})
        except UIError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to load is shown, named
            raise UIError(f"model {self.name}: cannot load {self.path} ({type(exc).__name__}: {exc})", 422) from None
        log.info("model %s loaded in %.1fs", self.name, time.perf_counter() - t0)
        return enc

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self.encoder()
        return enc.embed_texts(texts) if self.kind == "hf" else enc.embed_texts(texts, batch_size=256)

    def as_bench_encoder(self):
        """``bench.api.Encoder`` (what ``embed_eval_set`` calls)."""
        enc = self.encoder()
        if self.kind == "bundle":
            return enc
        return _HFEncoder(enc)


class _HFEncoder:
    def __init__(self, scorer):
        self.scorer = scorer

    def embed_images(self, images: list, batch_size: int = 64) -> torch.Tensor:
        return self.scorer.embed_images(images, [f"#{i}" for i in range(len(images))])

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        return self.scorer.embed_texts(texts)


def models_of(cfg: UIConfig) -> dict[str, Model]:
    out = {n.name: Model(n.name, "bundle", str(n.path)) for n in cfg.bundles}
    for n in cfg.hf_models:
        out[n.name] = Model(n.name, "hf", str(n.path))
    return out


# ---------------------------------------------------------------------------- the cache
class EmbeddingCache:
    def __init__(self, cache_dir: Path):
        self.dir = cache_dir
        self._mem: dict[str, Embedded] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(model: Model, source, split: str) -> str:
        """``source``: a ``ShardDir`` or an ``ImageFolder`` (its files stand for its content)."""
        parts = []
        for s in source.shards(split):
            try:
                st = s.stat()
            except OSError:
                raise UIError(f"{source.name}: {s} is missing", 404) from None
            parts.append([s.relative_to(source.path).as_posix(), st.st_size, st.st_mtime_ns])
        doc = {"version": CACHE_VERSION, "model": model.identity(), "split": split, "files": parts}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, model: Model, source, split: str) -> Embedded:
        key = self.key(model, source, split)
        with self._lock:
            if key in self._mem:
                return self._mem[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one embedding per split and model, however many requests ask at once
            if key in self._mem:
                return self._mem[key]
            emb = self._read(key)
            if emb is None:
                emb = self._embed(model, source, split)
                self._write(key, emb)
            with self._lock:
                self._mem[key] = emb
            return emb

    def _read(self, key: str) -> Embedded | None:
        from safetensors import safe_open

        st, js = self.dir / f"{key}.safetensors", self.dir / f"{key}.json"
        if not st.exists() or not js.exists():
            return None
        try:
            doc = json.loads(js.read_text())
            with safe_open(str(st), framework="numpy") as f:
                names = set(f.keys())
                img = f.get_tensor("img")
                n_txt = f.get_slice("txt").get_shape()[0]
                mapping = f.get_tensor("txt_to_img")
                dense_img = f.get_tensor("dense_img") if "dense_img" in names else np.zeros(0, np.int64)
            dim = img.shape[1]

            def load_texts() -> tuple[np.ndarray, np.ndarray]:
                try:
                    with safe_open(str(st), framework="numpy") as f:
                        txt = f.get_tensor("txt")
                        dense = f.get_tensor("dense") if "dense" in names else np.zeros((0, dim), np.float32)
                except (OSError, ValueError) as exc:
                    raise UIError(
                        f"embedding cache {st}: the text embeddings cannot be read any more ({exc}); "
                        "restart d2s ui to embed the split again",
                        500,
                    ) from None
                return txt, dense

            emb = Embedded(
                img,
                mapping,
                dense_img,
                doc["keys"],
                doc["captions"],
                doc["dense_texts"],
                loader=load_texts,
                cached=True,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache %s unreadable (%s): embedding again", st, exc)
            return None
        if len(emb.keys) != img.shape[0] or len(emb.captions) != n_txt or len(mapping) != n_txt:
            log.warning("cache %s does not match its key file: embedding again", st)
            return None
        return emb

    def _embed(self, model: Model, source, split: str) -> Embedded:
        from bench.api import RetrievalSettings, embed_eval_set
        from bench.data import DatasetError, load_shards
        from d2s.schema import SampleError

        t0 = time.perf_counter()
        encoder = model.as_bench_encoder()  # a model that cannot load fails first, named
        if isinstance(source, ImageFolder):
            emb = _embed_folder(encoder, model, source)
        else:
            try:
                data = load_shards(source.path, split, max_captions=0)
                e = embed_eval_set(encoder, data, RetrievalSettings(long_text=True))
            except (DatasetError, SampleError, FileNotFoundError, KeyError) as exc:
                raise UIError(f"model {model.name} on {source.path} ({split}): {exc}", 422) from None
            dim = e.img.shape[1]
            emb = Embedded(
                e.img.float().numpy(),
                e.txt_to_img.numpy(),
                e.dense_img.numpy() if e.dense_img is not None else np.zeros(0, np.int64),
                list(data.image_ids),
                list(data.captions),
                list(data.dense),
                txt=e.txt.float().numpy(),
                dense=e.dense.float().numpy() if e.dense is not None else np.zeros((0, dim), np.float32),
            )
        log.info("embedded %s/%s with %s in %.1fs", source.path, split, model.name, time.perf_counter() - t0)
        return emb

    def _write(self, key: str, emb: Embedded) -> None:
        """The key file, then the tensors through a temporary name (the completion marker)."""
        from safetensors.numpy import save

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                self.dir / f"{key}.json",
                {"keys": emb.keys, "captions": emb.captions, "dense_texts": emb.dense_texts},
            )
            tensors = {"img": emb.img, "txt": emb.txt, "txt_to_img": emb.txt_to_img}
            if len(emb.dense_texts):
                tensors.update(dense=emb.dense, dense_img=emb.dense_img)
            data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
            atomic_write_bytes(self.dir / f"{key}.safetensors", data)
        except OSError as exc:
            log.warning("cannot write the embedding cache in %s (%s): kept in memory only", self.dir, exc)


def _embed_folder(encoder, model: Model, folder: ImageFolder) -> Embedded:
    """Every image of a folder (no texts), read batch by batch; an image that cannot be
    decoded is named by its path."""
    from tqdm import tqdm

    files = folder.files()
    out = []
    step = 256
    for i in tqdm(range(0, len(files), step), desc=f"embed {folder.name}", unit="batch"):
        chunk = files[i : i + step]
        data = [p.read_bytes() for _, p in chunk]
        try:
            out.append(encoder.embed_images(data, batch_size=64).float())
        except Exception as exc:  # noqa: BLE001 - named below when an image is the cause
            bad = _first_undecodable(data)
            if bad is None:
                raise
            raise UIError(f"model {model.name}: cannot decode {folder.path / chunk[bad][0]} ({exc})", 422) from None
    img = torch.cat(out).numpy()
    dim = img.shape[1]
    empty = np.zeros(0, np.int64)
    return Embedded(
        img,
        empty,
        empty,
        [k for k, _ in files],
        [],
        [],
        txt=np.zeros((0, dim), np.float32),
        dense=np.zeros((0, dim), np.float32),
    )


def _first_undecodable(data: list[bytes]) -> int | None:
    import io

    from PIL import Image

    for j, b in enumerate(data):
        try:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB")
        except Exception:  # noqa: BLE001 - any failure to decode
            return j
    return None


# ---------------------------------------------------------------------------- queries
def engine_for(cfg: UIConfig, n_images: int) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    return "faiss" if n_images >= cfg.faiss_min_images and _has_faiss() else "exact"


def _has_faiss() -> bool:
    try:
        import faiss  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def text_to_images(model: Model, emb: Embedded, query: str, k: int, engine: str) -> list[dict[str, Any]]:
    q = model.embed_texts([query])[0].float().numpy()
    idx, scores = emb.top_images(q, k, engine)
    own = {int(emb.txt_to_img[j]) for j, c in enumerate(emb.captions) if c == query}
    out = []
    for rank, (i, s) in enumerate(zip(idx.tolist(), scores.tolist()), 1):
        caps = [emb.captions[j] for j in np.flatnonzero(emb.txt_to_img == i)[:2]]
        out.append({"rank": rank, "key": emb.keys[i], "score": round(float(s), 4), "captions": caps, "own": i in own})
    return out


def image_to_texts(emb: Embedded, key: str, k: int) -> list[dict[str, Any]]:
    try:
        i = emb.keys.index(key)
    except ValueError:
        raise UIError(f"no image with key {key!r} in this split", 404) from None
    q = emb.img[i]
    out = []
    for kind, mat, owners, texts in (
        ("sparse", emb.txt, emb.txt_to_img, emb.captions),
        ("dense", emb.dense, emb.dense_img, emb.dense_texts),
    ):
        if not len(texts):
            continue
        idx, scores = top_k(mat, q, k)
        for j, s in zip(idx.tolist(), scores.tolist()):
            owner = emb.keys[int(owners[j])]
            out.append({"kind": kind, "text": texts[j], "key": owner, "score": round(float(s), 4), "own": owner == key})
    out.sort(key=lambda r: -r["score"])
    for rank, r in enumerate(out[:k], 1):
        r["rank"] = rank
    return out[:k]
