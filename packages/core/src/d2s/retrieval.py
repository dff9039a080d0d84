"""Exact image-text retrieval metrics, computed in bounded memory (torch + numpy only).

The community protocol (VSE++ / VSE-infinity): image -> text ranks the image's
*best-ranked* caption among all captions; text -> image ranks each caption's one image
among all images. R@K is the percentage of queries whose 0-based rank is < K; rSum is the
sum of the six recalls; median and mean rank are 1-based.

How it is computed
------------------
Captions are grouped by the image they belong to (a stable sort of ``txt_to_img``; no
copy when the mapping is already sorted, as in the standard 5-captions-per-image layout).
Images are cut into blocks of ``chunk_size``; the captions of one image block form the
matching caption block. Phase A computes each *diagonal* tile (image block x its own
captions), which holds every positive pair, and reads the positive scores from it.
Phase B computes every off-diagonal tile once and adds, per query, the number of
candidates that rank before the positive. Every similarity is computed exactly once and
at most one ``chunk_size x (captions of chunk_size images)`` tile exists at a time, so
memory is bounded whatever N and M are. Ranks are exact with respect to the scores this
computes; no sorting is done.

Tie rule (``ties=``)
--------------------
``"stable"`` (default): a candidate whose score equals the positive's ranks before it
when it comes earlier in the corpus: for text -> image, the image with the lower index;
for image -> text, the caption earlier in (image index, caption index) order, which is
plain caption order for the usual sorted layout. Among an image's own tied captions the
earliest counts as its best. This equals ``np.argsort(-scores, kind="stable")``.
``"optimistic"``: ties never count against the positive (rank = number of strictly
greater scores). ``"pessimistic"``: every tied negative counts against it. A collapsed
model (all embeddings equal) scores ~0 under "stable" and "pessimistic" and 100 under
"optimistic"; that is why "optimistic" is not the default.

Protocols (:data:`PROTOCOLS`): ``coco_1k_5fold`` (five sequential folds of 1,000 images
and their captions, metrics averaged), ``coco_5k``, ``f30k_1k``, ``custom`` (any size),
``long_text`` (one dense description per image), and the published long-caption sets
``urban1k``, ``docci``, ``iiw``, ``dci``, ``sdci``, ``sharegpt4v_1k``, ``sharegpt4v_10k``,
``sharegpt4v_1k_longclip``
(subset, text rule and the table each follows are fields of :class:`Protocol`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from .registry import Registry

log = logging.getLogger(__name__)

TieRule = Literal["stable", "optimistic", "pessimistic"]
TIE_RULES = ("stable", "optimistic", "pessimistic")
DEFAULT_CHUNK_SIZE = 1024
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)


class RetrievalInputError(ValueError):
    """Embeddings, similarities or a caption-to-image mapping that cannot be evaluated."""


# --------------------------------------------------------------------------- results
@dataclass
class RetrievalMetrics:
    """Retrieval metrics with named fields (recalls in %, ranks 1-based)."""

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    rsum: float
    i2t_medr: float
    i2t_meanr: float
    t2i_medr: float
    t2i_meanr: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrievalMetrics:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise RetrievalInputError(f"metrics dict lacks field(s) {missing}")
        return cls(**{n: float(d[n]) for n in names})

    @classmethod
    def mean(cls, items: Sequence[RetrievalMetrics]) -> RetrievalMetrics:
        """Field-wise average (the COCO 1K convention averages every field, medr included)."""
        if not items:
            raise RetrievalInputError("cannot average an empty list of metrics")
        return cls(**{f.name: float(np.mean([getattr(m, f.name) for m in items])) for f in fields(cls)})


@dataclass
class RetrievalRanks:
    """0-based ranks: ``i2t[i]`` of image i's best caption, ``t2i[j]`` of caption j's image."""

    i2t: np.ndarray
    t2i: np.ndarray

    def metrics(self) -> RetrievalMetrics:
        return metrics_from_ranks(self.i2t, self.t2i)

    def curves(self, ks: Sequence[int] = CURVE_KS) -> dict[str, dict[int, float]]:
        return {"i2t": recall_at(self.i2t, ks), "t2i": recall_at(self.t2i, ks)}


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of 0-based ranks below each K."""
    r = np.asarray(ranks)
    return {int(k): float(100.0 * np.mean(r < k)) for k in ks}


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> RetrievalMetrics:
    """The reference formulas: R@K = 100 * mean(rank < K); medr = floor(median) + 1; meanr = mean + 1."""
    a = np.asarray(i2t_ranks, dtype=np.float64)
    b = np.asarray(t2i_ranks, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise RetrievalInputError("no ranks to summarise (empty image or text set)")
    r = {f"{d}_r{k}": float(100.0 * np.mean(x < k)) for d, x in (("i2t", a), ("t2i", b)) for k in (1, 5, 10)}

    def med(x: np.ndarray) -> float:
        return float(np.floor(np.median(x)) + 1) if np.all(np.isfinite(x)) else float("nan")

    return RetrievalMetrics(
        **r,
        rsum=sum(r.values()),
        i2t_medr=med(a),
        i2t_meanr=float(a.mean() + 1),
        t2i_medr=med(b),
        t2i_meanr=float(b.mean() + 1),
    )


# --------------------------------------------------------------------------- validation
def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise RetrievalInputError(f"{name}: cannot convert to a tensor ({exc})") from None


def _float(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)):
        return x.float()
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if bool(torch.isfinite(x.mul(0).sum())):  # fast path: 0 * finite sums to 0; NaN/inf give NaN
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten()
        raise RetrievalInputError(f"{name}: {int(rows.numel())} row(s) contain NaN or inf (first: row {int(rows[0])})")


def check_embeddings(img_emb: Any, txt_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    img = _float(_as_tensor(img_emb, "img_emb"))
    txt = _float(_as_tensor(txt_emb, "txt_emb"))
    for name, x in (("img_emb", img), ("txt_emb", txt)):
        if x.ndim != 2:
            raise RetrievalInputError(f"{name}: expected a 2-D [count, dim] array, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise RetrievalInputError(f"{name}: empty set (0 rows)")
        _check_finite(x, name)
    if img.shape[1] != txt.shape[1]:
        raise RetrievalInputError(
            f"embedding dims differ: img_emb has dim {img.shape[1]}, txt_emb has dim {txt.shape[1]}"
        )
    if txt.device != img.device:
        txt = txt.to(img.device)
    if txt.dtype != img.dtype:
        dt = torch.promote_types(img.dtype, txt.dtype)
        img, txt = img.to(dt), txt.to(dt)
    return img, txt


def default_txt_to_img(n_images: int, n_texts: int) -> torch.Tensor:
    """Caption j belongs to image j // (M // N); M must be a multiple of N."""
    if n_images <= 0 or n_texts <= 0:
        raise RetrievalInputError(f"empty set: {n_images} images, {n_texts} texts")
    if n_texts % n_images:
        raise RetrievalInputError(
            f"{n_texts} texts is not a multiple of {n_images} images: pass an explicit txt_to_img mapping"
        )
    return torch.arange(n_texts) // (n_texts // n_images)


def check_mapping(txt_to_img: Any, n_images: int, n_texts: int) -> torch.Tensor:
    """Validate a caption -> image mapping (every caption points at an image, every image has one)."""
    if txt_to_img is None:
        return default_txt_to_img(n_images, n_texts)
    m = _as_tensor(txt_to_img, "txt_to_img").cpu()
    if m.ndim != 1 or m.shape[0] != n_texts:
        raise RetrievalInputError(
            f"txt_to_img: expected shape [{n_texts}] (one image index per text), got {tuple(m.shape)}"
        )
    if m.is_floating_point() or m.dtype == torch.bool or m.is_complex():
        if m.is_floating_point() and bool((m == m.round()).all()):
            m = m.long()
        else:
            raise RetrievalInputError(f"txt_to_img: expected integer image indices, got dtype {m.dtype}")
    m = m.long()
    bad = ((m < 0) | (m >= n_images)).nonzero().flatten()
    if bad.numel():
        j = int(bad[0])
        raise RetrievalInputError(
            f"txt_to_img: text {j} points at image {int(m[j])}, but there are only {n_images} images "
            f"({bad.numel()} text(s) point at missing images)"
        )
    counts = torch.bincount(m, minlength=n_images)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise RetrievalInputError(
            f"txt_to_img: image {int(empty[0])} has no text ({empty.numel()} image(s) without any); "
            "image->text rank is undefined for them: drop them from the image set"
        )
    return m


# --------------------------------------------------------------------------- exact ranks
class _Grouped:
    """Captions grouped by image: column order, offsets per image, owner image of each column."""

    def __init__(self, mapping: torch.Tensor, n_images: int):
        if bool((mapping[1:] >= mapping[:-1]).all()):
            self.order = None
            col_img = mapping
        else:
            self.order = torch.argsort(mapping, stable=True)
            col_img = mapping[self.order]
        self.col_img = col_img
        counts = torch.bincount(mapping, minlength=n_images)
        self.offsets = torch.zeros(n_images + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(counts, 0)

    def to_original(self, grouped_values: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return grouped_values
        out = torch.empty_like(grouped_values)
        out[self.order] = grouped_values
        return out


# One function on purpose (73 lines): the hot loop over similarity tiles; helpers per tile would add
# calls and re-read tensors for no gain, and the two phases share the per-block maxima m_img / m_txt.
def _rank_tiles(get_tile, n_images: int, grouped: _Grouped, chunk_size: int, ties: str, device, progress: bool):
    if ties not in TIE_RULES:
        raise RetrievalInputError(f"ties: expected one of {list(TIE_RULES)}, got {ties!r}")
    if chunk_size < 1:
        raise RetrievalInputError(f"chunk_size must be >= 1, got {chunk_size}")
    n_texts = int(grouped.offsets[-1])
    blocks = [(a, min(a + chunk_size, n_images)) for a in range(0, n_images, chunk_size)]
    off = grouped.offsets.tolist()
    cblocks = [(off[a], off[b]) for a, b in blocks]
    col_img = grouped.col_img.to(device)
    i2t = torch.zeros(n_images, dtype=torch.long, device=device)
    t2i = torch.zeros(n_texts, dtype=torch.long, device=device)
    m_img: list[torch.Tensor] = []
    m_txt: list[torch.Tensor] = []

    # Phase A: diagonal tiles hold every positive pair.
    for (a, b), (c0, c1) in zip(blocks, cblocks):
        s = get_tile(a, b, c0, c1)
        nr, nc = b - a, c1 - c0
        rows = col_img[c0:c1] - a  # local row of each column's own image
        cols = torch.arange(nc, device=device)
        mt = s[rows, cols]
        pos = rows.unsqueeze(0) == torch.arange(nr, device=device).unsqueeze(1)
        mi = s.masked_fill(~pos, -math.inf).amax(1)
        if not bool(torch.isfinite(mi).all()) or not bool(torch.isfinite(mt).all()):
            raise RetrievalInputError("similarities overflowed to inf/NaN: rescale the embeddings")
        m_img.append(mi)
        m_txt.append(mt)
        if ties == "optimistic":
            ci = (s > mi[:, None]).sum(1, dtype=torch.int32)
            ct = (s > mt[None, :]).sum(0, dtype=torch.int32)
        elif ties == "pessimistic":
            ci = ((s >= mi[:, None]) & ~pos).sum(1, dtype=torch.int32)
            ct = ((s >= mt[None, :]) & ~pos).sum(0, dtype=torch.int32)
        else:
            eq_i = s == mi[:, None]
            first = (pos & eq_i).to(torch.uint8).argmax(1)  # earliest best positive
            ci = (s > mi[:, None]).sum(1, dtype=torch.int32)
            ci += (eq_i & (cols[None, :] < first[:, None])).sum(1, dtype=torch.int32)
            rpos = torch.arange(nr, device=device)[:, None]
            ct = (s > mt[None, :]).sum(0, dtype=torch.int32)
            ct += ((s == mt[None, :]) & (rpos < rows[None, :])).sum(0, dtype=torch.int32)
        i2t[a:b] += ci
        t2i[c0:c1] += ct

    # Phase B: every off-diagonal tile, computed once; one comparison per direction.
    nb = len(blocks)
    it = range(nb)
    if progress and nb > 2:
        from tqdm import tqdm

        it = tqdm(it, desc="retrieval blocks", unit="block", leave=False)
    for k in it:
        a, b = blocks[k]
        mi = m_img[k][:, None]
        for lb in range(nb):
            if lb == k:
                continue
            c0, c1 = cblocks[lb]
            s = get_tile(a, b, c0, c1)
            mt = m_txt[lb][None, :]
            if ties == "optimistic":
                ci, ct = s > mi, s > mt
            elif ties == "pessimistic":
                ci, ct = s >= mi, s >= mt
            else:
                # captions of earlier image blocks precede the image's own captions; images of
                # block k precede caption's image when k < lb.
                ci = s >= mi if lb < k else s > mi
                ct = s >= mt if k < lb else s > mt
            i2t[a:b] += ci.sum(1, dtype=torch.int32)  # int32 sums of bools are ~2x faster than int64
            t2i[c0:c1] += ct.sum(0, dtype=torch.int32)
    return i2t.cpu(), grouped.to_original(t2i.cpu())


def retrieval_ranks(
    img_emb: Any,
    txt_emb: Any,
    txt_to_img: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ties: TieRule = "stable",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RetrievalRanks:
    """Exact 0-based ranks from embeddings (scores = inner products), in bounded memory."""
    img, txt = check_embeddings(img_emb, txt_emb)
    mapping = check_mapping(txt_to_img, img.shape[0], txt.shape[0])
    if device is not None:
        img, txt = img.to(device), txt.to(device)
    g = _Grouped(mapping, img.shape[0])
    txt_g = txt if g.order is None else txt[g.order.to(txt.device)]

    def tile(a: int, b: int, c0: int, c1: int) -> torch.Tensor:
        return img[a:b] @ txt_g[c0:c1].T

    with torch.inference_mode():
        i2t, t2i = _rank_tiles(tile, img.shape[0], g, chunk_size, ties, img.device, progress)
    return RetrievalRanks(i2t.numpy(), t2i.numpy())


def retrieval_ranks_from_similarity(
    sim: Any,
    txt_to_img: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ties: TieRule = "stable",
) -> RetrievalRanks:
    """Exact 0-based ranks from a precomputed [N images, M texts] similarity matrix."""
    s = _float(_as_tensor(sim, "sim"))
    if s.ndim != 2:
        raise RetrievalInputError(f"sim: expected a 2-D [images, texts] matrix, got shape {tuple(s.shape)}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise RetrievalInputError(f"sim: empty set, shape {tuple(s.shape)}")
    _check_finite(s, "sim")
    mapping = check_mapping(txt_to_img, s.shape[0], s.shape[1])
    g = _Grouped(mapping, s.shape[0])
    order = None if g.order is None else g.order.to(s.device)

    def tile(a: int, b: int, c0: int, c1: int) -> torch.Tensor:
        return s[a:b, c0:c1] if order is None else s[a:b][:, order[c0:c1]]

    with torch.inference_mode():
        i2t, t2i = _rank_tiles(tile, s.shape[0], g, chunk_size, ties, s.device, False)
    return RetrievalRanks(i2t.numpy(), t2i.numpy())


def retrieval_metrics(
    img_emb: Any,
    txt_emb: Any,
    txt_to_img: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ties: TieRule = "stable",
    device: str | torch.device | None = None,
) -> RetrievalMetrics:
    """R@1/5/10 both ways, rSum, median/mean rank; ``txt_to_img=None`` means caption j -> image j // (M // N)."""
    return retrieval_ranks(img_emb, txt_emb, txt_to_img, chunk_size=chunk_size, ties=ties, device=device).metrics()


def retrieval_metrics_from_similarity(
    sim: Any, txt_to_img: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE, ties: TieRule = "stable"
) -> RetrievalMetrics:
    return retrieval_ranks_from_similarity(sim, txt_to_img, chunk_size=chunk_size, ties=ties).metrics()


# --------------------------------------------------------------------------- FAISS (optional)
def faiss_ranks(img_emb: Any, txt_emb: Any, txt_to_img: Any = None, *, k: int = 100) -> RetrievalRanks:
    """Top-k ranks with a FAISS flat inner-product index (for corpora where only R@K is wanted).

    Ranks are censored at ``k``: a positive not in the top k gets rank ``k`` (so R@K is exact
    for K <= k up to the order FAISS gives tied scores; medr is exact while it is <= k; meanr
    is a lower bound). Needs ``faiss-cpu`` (``pip install d2s-bench[faiss]``).
    """
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise RetrievalInputError("the FAISS path needs faiss-cpu: pip install faiss-cpu") from None
    img, txt = check_embeddings(img_emb, txt_emb)
    mapping = check_mapping(txt_to_img, img.shape[0], txt.shape[0])
    xi = np.ascontiguousarray(img.cpu().float().numpy())
    xt = np.ascontiguousarray(txt.cpu().float().numpy())
    mp = mapping.numpy()
    # image -> text: search captions; best rank of any of the image's captions in the top k
    index_t = faiss.IndexFlatIP(xt.shape[1])
    index_t.add(xt)
    _, it = index_t.search(xi, min(k, xt.shape[0]))
    hit = mp[np.where(it < 0, 0, it)] == np.arange(xi.shape[0])[:, None]
    hit &= it >= 0
    i2t = np.where(hit.any(1), hit.argmax(1), k)
    del index_t
    index_i = faiss.IndexFlatIP(xi.shape[1])
    index_i.add(xi)
    _, ii = index_i.search(xt, min(k, xi.shape[0]))
    hit = ii == mp[:, None]
    t2i = np.where(hit.any(1), hit.argmax(1), k)
    return RetrievalRanks(i2t.astype(np.int64), t2i.astype(np.int64))


# --------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: which images (and folds) it expects."""

    name: str
    description: str
    n_images: int | None = None  # required image count, None = any
    n_folds: int = 1  # >1: sequential folds of n_images / n_folds images, metrics averaged
    one_text_per_image: bool = False
    subset: str = ""  # which images and texts of the published set
    texts: str = ""  # how each text is read from the publisher's files
    reproduces: str = ""  # the published table whose numbers this protocol follows


PROTOCOLS: Registry[Protocol] = Registry(
    "protocol", "d2s.protocols", base=Protocol, error=RetrievalInputError, name_attr=None, items="instance"
)
"""Evaluation protocols by name; another package adds one with a ``d2s.protocols`` entry point
(a :class:`Protocol` instance) or ``PROTOCOLS.add(name, Protocol(...))``."""
_KARPATHY_TEST = "the {n} images of the Karpathy split's 'test' set ({set}), in file order"
_KARPATHY_TEXTS = "the 'raw' sentences, the first 5 per image (max_captions; COCO images with 6-7 keep 5)"
_LOTLIP_TEXT = "split at newlines, '</s>' and '.', stripped, empty parts dropped, joined with '. ' (LoTLIP's loaders)"
for _p in (
    Protocol(
        "coco_1k_5fold",
        "COCO 1K: five sequential folds of 1,000 images and their captions, averaged",
        5000,
        5,
        subset=_KARPATHY_TEST.format(set="COCO", n="5,000"),
        texts=_KARPATHY_TEXTS,
        reproduces="the COCO 1K columns of VSE++ / VSE-infinity / D2S-VSE (five folds averaged)",
    ),
    Protocol(
        "coco_5k",
        "COCO 5K: 5,000 test images x their captions (25,000)",
        5000,
        subset=_KARPATHY_TEST.format(set="COCO", n="5,000"),
        texts=_KARPATHY_TEXTS,
        reproduces="the COCO 5K columns of VSE++ / VSE-infinity / D2S-VSE",
    ),
    Protocol(
        "f30k_1k",
        "Flickr30K 1K: 1,000 test images x their captions (5,000)",
        1000,
        subset=_KARPATHY_TEST.format(set="Flickr30K", n="1,000"),
        texts=_KARPATHY_TEXTS,
        reproduces="the Flickr30K columns of VSE++ / VSE-infinity / D2S-VSE",
    ),
    Protocol("custom", "any split: all given images x all given texts"),
    Protocol("long_text", "long-text retrieval: one dense description per image", None, 1, True),
    # the long-caption sets (loaders: bench.datasets; sources and licences: docs/benchmarks.md)
    Protocol(
        "urban1k",
        "Urban1k: 1,000 urban images x one long caption each",
        1000,
        1,
        True,
        subset="all 1,000 pairs of Urban1k (image/<n>.jpg, caption/<n>.txt)",
        texts="the first line of each caption file (Long-CLIP eval/retrieval/Urban1k.py)",
        reproduces="Long-CLIP (ECCV 2024) long-caption retrieval table, Urban-1k columns",
    ),
    Protocol(
        "docci",
        "DOCCI test: 5,000 images x one human description each",
        5000,
        1,
        True,
        subset="the 5,000 entries of docci_descriptions.jsonlines with split 'test'",
        texts="the 'description' field as given",
        reproduces="the 5,000-pair DOCCI test retrieval reported by FLAIR (CVPR 2025) and FG-CLIP",
    ),
    Protocol(
        "iiw",
        "IIW: 612 images x one IIW human description each",
        612,
        1,
        True,
        subset="DOCCI_Test (100) + IIW-400 (400) + DCI_Test (112) of google/imageinwords datasets/, in LoTLIP's order",
        texts="the 'IIW' field, " + _LOTLIP_TEXT,
        reproduces="LoTLIP (NeurIPS 2024) long-text retrieval table, IIW columns",
    ),
    Protocol(
        "dci",
        "DCI: 7,805 images x one long caption each",
        7805,
        1,
        True,
        subset="every annotation listed in splits.json (train, valid and test together), as LoTLIP",
        texts="short_caption + newline + extra_caption, " + _LOTLIP_TEXT,
        reproduces="LoTLIP (NeurIPS 2024) long-text retrieval table, DCI columns",
    ),
    Protocol(
        "sdci",
        "sDCI: the DCI images x their LLM summary (under 77 CLIP tokens)",
        7805,
        1,
        True,
        subset="every annotation listed in splits.json, as the 'dci' protocol",
        texts="summaries['base'][0] of the complete/ file (the first of the published summaries)",
        reproduces="no published retrieval table: the short-text control of 'dci' on the same images",
    ),
    Protocol(
        "sharegpt4v_1k",
        "ShareGPT4V-1k: 1,000 SA-1B images x their ShareCaptioner caption",
        1000,
        1,
        True,
        subset="the first 1,000 SA-1B entries (image file sa_*.jpg) of share-captioner_coco_lcs_sam_1246k_1107.json",
        texts="conversations[1].value, " + _LOTLIP_TEXT,
        reproduces="LoTLIP (NeurIPS 2024) long-text retrieval table, ShareGPT4V-1k columns",
    ),
    Protocol(
        "sharegpt4v_10k",
        "ShareGPT4V-10k: 10,000 SA-1B images x their ShareCaptioner caption",
        10000,
        1,
        True,
        subset="the first 10,000 SA-1B entries (image file sa_*.jpg) of share-captioner_coco_lcs_sam_1246k_1107.json",
        texts="conversations[1].value, " + _LOTLIP_TEXT,
        reproduces="LoTLIP (NeurIPS 2024) long-text retrieval table, ShareGPT4V-10k columns",
    ),
    Protocol(
        "sharegpt4v_1k_longclip",
        "ShareGPT4V-1k as Long-CLIP cuts it: the first 1,000 entries (COCO images) x their caption",
        1000,
        1,
        True,
        subset="the first 1,000 entries of share-captioner_coco_lcs_sam_1246k_1107.json, any image source",
        texts="conversations[1].value with newlines replaced by spaces (Long-CLIP train/sharegpt4v.py)",
        reproduces="Long-CLIP (ECCV 2024) long-caption retrieval table, ShareGPT4V-1k columns; FG-CLIP's 1k",
    ),
):
    PROTOCOLS.add(_p.name, _p)


def list_protocols() -> list[str]:
    return PROTOCOLS.names()


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)


@dataclass
class ProtocolResult:
    protocol: str
    n_images: int
    n_texts: int
    ties: str
    metrics: RetrievalMetrics
    folds: list[RetrievalMetrics] = field(default_factory=list)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    # every query's 0-based rank over all folds (``ranks.t2i`` in the caller's caption order) and
    # the caption -> image mapping, for intervals; in memory only (``to_dict`` leaves them out)
    ranks: RetrievalRanks | None = field(default=None, repr=False, compare=False)
    txt_to_img: np.ndarray | None = field(default=None, repr=False, compare=False)
    n_folds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "n_images": self.n_images,
            "n_texts": self.n_texts,
            "ties": self.ties,
            "metrics": self.metrics.to_dict(),
            "folds": [f.to_dict() for f in self.folds],
            "curves": {d: {str(k): v for k, v in c.items()} for d, c in self.curves.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProtocolResult:
        return cls(
            protocol=d["protocol"],
            n_images=int(d["n_images"]),
            n_texts=int(d["n_texts"]),
            ties=d.get("ties", "stable"),
            metrics=RetrievalMetrics.from_dict(d["metrics"]),
            folds=[RetrievalMetrics.from_dict(f) for f in d.get("folds", [])],
            curves={k: {int(kk): float(vv) for kk, vv in c.items()} for k, c in d.get("curves", {}).items()},
            n_folds=max(1, len(d.get("folds", []))),
        )


def evaluate_protocol(
    protocol: str | Protocol,
    img_emb: Any,
    txt_emb: Any,
    txt_to_img: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ties: TieRule = "stable",
    device: str | torch.device | None = None,
    curve_ks: Sequence[int] = CURVE_KS,
    engine: Literal["exact", "faiss"] = "exact",
    faiss_k: int = 100,
) -> ProtocolResult:
    """Evaluate under a named protocol; folds are sequential image ranges with their own captions.

    ``engine="faiss"`` ranks with :func:`faiss_ranks` (censored at ``faiss_k``); exact is the default.
    """
    if engine not in ("exact", "faiss"):
        raise RetrievalInputError(f"engine: expected 'exact' or 'faiss', got {engine!r}")
    p = get_protocol(protocol) if isinstance(protocol, str) else protocol
    img, txt = check_embeddings(img_emb, txt_emb)
    n, m = img.shape[0], txt.shape[0]
    mapping = check_mapping(txt_to_img, n, m)
    if p.n_images is not None and n != p.n_images:
        raise RetrievalInputError(
            f"protocol {p.name!r} expects {p.n_images} images, got {n} (wrong split? use protocol 'custom' for other sizes)"
        )
    if p.one_text_per_image and m != n:
        raise RetrievalInputError(f"protocol {p.name!r} expects one text per image, got {m} texts for {n} images")
    if n % p.n_folds:
        raise RetrievalInputError(f"protocol {p.name!r}: {n} images do not split into {p.n_folds} equal folds")
    fold = n // p.n_folds
    folds, curves_i2t, curves_t2i = [], [], []
    all_i2t = np.zeros(n, np.int64)
    all_t2i = np.zeros(m, np.int64)
    for f in range(p.n_folds):
        a, b = f * fold, (f + 1) * fold
        sel = ((mapping >= a) & (mapping < b)).nonzero().flatten()
        fi, ft, fm = img[a:b], txt[sel.to(txt.device)], mapping[sel] - a
        if engine == "faiss":
            ranks = faiss_ranks(fi, ft, fm, k=faiss_k)
        else:
            ranks = retrieval_ranks(fi, ft, fm, chunk_size=chunk_size, ties=ties, device=device)
        folds.append(ranks.metrics())
        all_i2t[a:b] = ranks.i2t
        all_t2i[sel.numpy()] = ranks.t2i
        c = ranks.curves(curve_ks)
        curves_i2t.append(c["i2t"])
        curves_t2i.append(c["t2i"])

    def avg(cs: list[dict[int, float]]) -> dict[int, float]:
        return {k: float(np.mean([c[k] for c in cs])) for k in cs[0]}

    return ProtocolResult(
        protocol=p.name,
        n_images=n,
        n_texts=m,
        ties=ties if engine == "exact" else f"faiss (ranks censored at {faiss_k})",
        metrics=RetrievalMetrics.mean(folds),
        folds=folds if p.n_folds > 1 else [],
        curves={"i2t": avg(curves_i2t), "t2i": avg(curves_t2i)},
        ranks=RetrievalRanks(all_i2t, all_t2i),
        txt_to_img=mapping.numpy(),
        n_folds=p.n_folds,
    )
