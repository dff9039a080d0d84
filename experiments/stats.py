"""Summary statistics of the experiments: mean +- sd over seeds and paired 95% intervals.

The intervals are Student t intervals over the per-seed differences of two arms that share
everything but the one thing compared (the same seed, data and stage 1), with the quantile
from scipy, so any number of seeds works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired differences: a two-sided Student t interval with
    n - 1 degrees of freedom; low and high are NaN with fewer than two differences."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"paired_interval: need a non-empty list of differences, got {diffs!r}")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def fmt_interval(mean: float, lo: float, hi: float) -> str:
    """``+1.2 [-0.3, +2.7]`` (no interval for one seed)."""
    if math.isnan(lo):
        return f"{mean:+.1f} (one seed)"
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"
