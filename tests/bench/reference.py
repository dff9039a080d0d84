"""Brute-force references for the retrieval metrics: one query at a time, full sorts.

Written the straightforward way on purpose (per-query argsort like the VSE++ reference
code) so that the optimised paths in d2s.retrieval have something independent to agree with.
"""

from __future__ import annotations

import numpy as np


def brute_ranks(sim: np.ndarray, txt_to_img: np.ndarray, ties: str = "stable") -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks by sorting every query's scores; ties per the documented rule."""
    n, m = sim.shape
    txt_to_img = np.asarray(txt_to_img)
    # i2t tie order: captions ordered by (owning image, caption index)
    group_pos = np.empty(m, dtype=np.int64)
    group_pos[np.lexsort((np.arange(m), txt_to_img))] = np.arange(m)
    i2t = np.zeros(n, dtype=np.int64)
    for i in range(n):
        d = sim[i]
        positive = txt_to_img == i
        if ties == "stable":
            order = np.lexsort((group_pos, -d))
        elif ties == "optimistic":
            order = np.lexsort((group_pos, ~positive, -d))
        else:
            order = np.lexsort((group_pos, positive, -d))
        where = np.nonzero(positive[order])[0]
        i2t[i] = where.min()
    t2i = np.zeros(m, dtype=np.int64)
    for j in range(m):
        d = sim[:, j]
        positive = np.arange(n) == txt_to_img[j]
        if ties == "stable":
            order = np.lexsort((np.arange(n), -d))
        elif ties == "optimistic":
            order = np.lexsort((np.arange(n), ~positive, -d))
        else:
            order = np.lexsort((np.arange(n), positive, -d))
        t2i[j] = np.nonzero(order == txt_to_img[j])[0][0]
    return i2t, t2i


def brute_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    return out


def reference_loops(ims: np.ndarray, caps: np.ndarray, per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The VSE++ i2t / t2i loops (per-query dot product + argsort), with a stable descending sort."""
    npts = ims.shape[0]
    ranks = np.zeros(npts)
    for index in range(npts):
        d = np.dot(ims[index : index + 1], caps.T).flatten()
        inds = np.argsort(-d, kind="stable")
        rank = 1e20
        for i in range(per_image * index, per_image * index + per_image, 1):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    ranks_t = np.zeros(per_image * npts)
    for index in range(npts):
        queries = caps[per_image * index : per_image * index + per_image]
        d = np.dot(queries, ims.T)
        for i in range(len(d)):
            inds = np.argsort(-d[i], kind="stable")
            ranks_t[per_image * index + i] = np.where(inds == index)[0][0]
    return ranks.astype(np.int64), ranks_t.astype(np.int64)
