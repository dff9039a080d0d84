"""Speed of bench's bootstrap intervals against a plain per-replicate loop, on COCO-5K sizes.

* bench: bench.intervals.bootstrap_replicates (counts of a block of replicates as one [b, n]
  matrix; one matrix product per block with the per-image hit table)
* loop:  the obvious implementation: per replicate, draw n image indices, gather their hits and
  their captions' hits, take the means (numpy, one replicate at a time)

Both draw with the same generator in the same order of calls, so the two must give the same
replicates exactly (asserted): the speed-up is not bought with another resampling.

    python benchmarks/bench_bootstrap.py                        # 5,000 images x 5 captions, B = 1,000
    python benchmarks/bench_bootstrap.py --images 1000 --per-image 1 --replicates 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.intervals import KS, BootstrapSettings, QueryRanks, bootstrap_replicates


def loop_replicates(r: QueryRanks, s: BootstrapSettings) -> dict[str, np.ndarray]:
    """One replicate at a time; the same draws as bench's (one ``integers`` call per replicate
    block of size 1 gives the same stream as a block of b when read row by row)."""
    n = r.i2t.shape[0]
    rng = np.random.default_rng(s.seed)
    per_image = [np.flatnonzero(r.txt_to_img == i) for i in range(n)]
    out = {f"{d}_r{k}": np.zeros(s.replicates) for d in ("i2t", "t2i") for k in KS}
    idx_all = rng.integers(0, n, size=(s.replicates, n))  # the draws, row by row
    for b in range(s.replicates):
        idx = idx_all[b]
        caps = np.concatenate([per_image[i] for i in idx])
        for k in KS:
            out[f"i2t_r{k}"][b] = 100.0 * np.mean(r.i2t[idx] < k)
            out[f"t2i_r{k}"][b] = 100.0 * np.mean(r.t2i[caps] < k)
    out["rsum"] = sum(out[m] for m in list(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--replicates", type=int, default=1000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n, m = args.images, args.images * args.per_image
    r = QueryRanks(rng.integers(0, 40, n), rng.integers(0, 40, m), np.repeat(np.arange(n), args.per_image))
    # one block holding every replicate, so both read the generator in the same order
    s = BootstrapSettings(replicates=args.replicates, seed=0)
    import bench.intervals as iv

    iv._BLOCK_CELLS = max(iv._BLOCK_CELLS, args.replicates * n)
    t0 = time.perf_counter()
    fast = bootstrap_replicates(r, s)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = loop_replicates(r, s)
    t_slow = time.perf_counter() - t0
    for k in fast:
        np.testing.assert_allclose(fast[k], slow[k], rtol=0, atol=1e-9, err_msg=k)
    print(f"{n} images x {args.per_image} captions, B = {args.replicates}: replicates identical")
    print("| bootstrap | seconds | ratio |\n|---|---|---|")
    print(f"| bench (blocks of replicates, matrix products) | {t_fast:.2f} | 1.00x |")
    print(f"| per-replicate loop (numpy) | {t_slow:.2f} | bench is {t_slow / t_fast:.1f}x faster |")


if __name__ == "__main__":
    main()
