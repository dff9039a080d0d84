"""Speed of d2s.retrieval (what `bench` runs) against the reference per-query loops and a matmul.

Part 1, COCO-5K sized (5,000 images x 25,000 captions, dim 1,024):
  * bench: d2s.retrieval.retrieval_ranks (chunked, exact)
  * loop:  the VSE++ per-query numpy loops (dot + argsort per query) as re-implemented in
           tests/bench/reference.py, the oracle the tests check bench against; its ranks must
           equal bench's exactly (asserted). The embeddings are small integers, so every dot
           product is exact in float32 whatever the summation order, and the loop sorts with
           kind="stable", the tie rule bench documents.
  * floor: one img @ txt.T matmul of the same sizes (nothing is ranked).
Part 2, large: 100k x 500k by default, FAISS flat inner product (top-k) and the exact chunked
path, each in a fresh process so its peak memory (max RSS) is its own. Use --large-* to shrink.

    python benchmarks/bench_speed.py                    # full run
    python benchmarks/bench_speed.py --images 1000 --large-images 5000 --large-texts 25000
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d2s.retrieval import faiss_ranks, metrics_from_ranks, retrieval_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bench.reference import reference_loops  # noqa: E402  (the loops the tests check bench against)

log = logging.getLogger(__name__)


def int_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    # |entries| <= 127 and dim <= 1024: every partial sum is an integer below 2**24, exact in float32
    return np.random.default_rng(seed).integers(-127, 128, size=(n, dim)).astype(np.float32)


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _large_child(engine: str, n: int, m: int, dim: int, chunk: int, k: int, q) -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(m, dim), dim=1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = faiss_ranks(img, txt, k=k) if engine == "faiss" else retrieval_ranks(img, txt, chunk_size=chunk)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put(
        {
            "engine": engine,
            "seconds": sec,
            "peak_rss_gib": peak / 2**20,
            "inputs_rss_gib": base / 2**20,
            "i2t_r1": metrics_from_ranks(r.i2t, r.t2i).i2t_r1,
        }
    )


def run_large(engine: str, n: int, m: int, dim: int, chunk: int, k: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_large_child, args=(engine, n, m, dim, chunk, k, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for bench and the matmul")
    ap.add_argument("--skip-loop", action="store_true", help="skip the (slow) reference loop")
    ap.add_argument("--large-images", type=int, default=100_000)
    ap.add_argument("--large-texts", type=int, default=500_000)
    ap.add_argument("--large-dim", type=int, default=1024)
    ap.add_argument("--large-engines", default="faiss,exact", help="comma list of faiss, exact ('' to skip)")
    ap.add_argument("--faiss-k", type=int, default=10)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    n, m, d = args.images, args.images * args.per_image, args.dim
    log.info("COCO-5K sized: %d images x %d captions, dim %d, torch threads %d", n, m, d, torch.get_num_threads())
    img_np, txt_np = int_embeddings(n, d, 0), int_embeddings(m, d, 1)
    img, txt = torch.from_numpy(img_np), torch.from_numpy(txt_np)

    t_floor, _ = timed(lambda: img @ txt.T, args.repeat)
    t_bench, ranks = timed(lambda: retrieval_ranks(img, txt, chunk_size=args.chunk_size), args.repeat)
    rows = [
        ("one matmul img @ txt.T (floor)", t_floor, "1.00x floor"),
        ("bench (d2s.retrieval, exact)", t_bench, f"{t_bench / t_floor:.2f}x floor"),
    ]
    if not args.skip_loop:
        t_loop, (ri, rt) = timed(lambda: reference_loops(img_np, txt_np, args.per_image))
        np.testing.assert_array_equal(ranks.i2t, ri)
        np.testing.assert_array_equal(ranks.t2i, rt)
        assert metrics_from_ranks(ri, rt) == ranks.metrics()
        rows.append(("reference per-query loops (numpy)", t_loop, f"bench is {t_loop / t_bench:.1f}x faster"))
        log.info("ranks identical to the reference loops (%d i2t, %d t2i)", n, m)

    print(f"\n| {n} x {m}, dim {d} | seconds | ratio |\n|---|---|---|")
    for name, sec, ratio in rows:
        print(f"| {name} | {sec:.2f} | {ratio} |", flush=True)

    large = []
    for engine in [e for e in args.large_engines.split(",") if e]:
        log.info("large: %s on %d x %d, dim %d ...", engine, args.large_images, args.large_texts, args.large_dim)
        large.append(
            run_large(engine, args.large_images, args.large_texts, args.large_dim, args.chunk_size, args.faiss_k)
        )
    if large:
        print(
            f"\n| {args.large_images} x {args.large_texts}, dim {args.large_dim} | seconds | peak RSS GiB | of which inputs |\n|---|---|---|---|"
        )
        for r in large:
            label = f"FAISS IndexFlatIP top-{args.faiss_k}" if r["engine"] == "faiss" else "bench exact chunked"
            print(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['inputs_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
