"""The experiments' interval arithmetic against textbook values (t-table, hand sums)."""

import math

import pytest

from experiments.stats import fmt_interval, mean_sd, paired_interval


def test_paired_interval_matches_the_t_table():
    # 5 differences: mean 2, sd sqrt(2.5); t(4, 0.975) = 2.776 (any t-table)
    mean, lo, hi = paired_interval([0.0, 1.0, 2.0, 3.0, 4.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 2.0 and lo == pytest.approx(2.0 - half, abs=1e-3) and hi == pytest.approx(2.0 + half, abs=1e-3)


def test_twelve_seeds_work():
    # the old hand-written table stopped at 10 degrees of freedom; t(11, 0.975) = 2.201
    d = [float(i) for i in range(1, 13)]
    mean, lo, hi = paired_interval(d)
    sd = math.sqrt(sum((x - 6.5) ** 2 for x in d) / 11)
    assert mean == 6.5 and hi - mean == pytest.approx(2.201 * sd / math.sqrt(12), abs=1e-3)


def test_one_seed_has_no_interval_and_empty_is_an_error():
    mean, lo, hi = paired_interval([1.5])
    assert mean == 1.5 and math.isnan(lo) and math.isnan(hi)
    assert fmt_interval(mean, lo, hi) == "+1.5 (one seed)"
    with pytest.raises(ValueError, match="non-empty"):
        paired_interval([])


def test_mean_sd_and_format():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([4.0]) == (4.0, 0.0)
    assert fmt_interval(1.25, -0.5, 3.0) == "+1.2 [-0.5, +3.0]"
