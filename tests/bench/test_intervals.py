"""Bootstrap intervals: cases whose interval is known by hand, the resampling law, paired differences."""

import math

import numpy as np
import pytest

from bench.api import Embeddings, RetrievalSettings, evaluate_embeddings
from bench.intervals import (
    INTERVAL_METRICS,
    BootstrapSettings,
    QueryRanks,
    bootstrap_intervals,
    bootstrap_replicates,
    paired_difference,
    point_recalls,
)
from d2s.retrieval import RetrievalInputError, evaluate_protocol, metrics_from_ranks


def one_per_image(i2t, t2i):
    return QueryRanks(np.array(i2t), np.array(t2i), np.arange(len(t2i)))


def test_all_hits_give_degenerate_full_intervals():
    r = QueryRanks(np.zeros(4, int), np.zeros(20, int), np.repeat(np.arange(4), 5))
    iv = bootstrap_intervals(r, BootstrapSettings(replicates=200))
    assert all(iv[m] == [100.0, 100.0] for m in INTERVAL_METRICS if m != "rsum")
    assert iv["rsum"] == [600.0, 600.0]


def test_one_query_every_resample_is_the_same():
    # one image, one caption, ranked 3rd (0-based 2) both ways: R@1 = 0, R@5 = R@10 = 100
    iv = bootstrap_intervals(one_per_image([2], [2]), BootstrapSettings(replicates=50))
    assert iv["i2t_r1"] == [0.0, 0.0] and iv["i2t_r5"] == [100.0, 100.0] and iv["t2i_r10"] == [100.0, 100.0]
    assert iv["rsum"] == [400.0, 400.0]


def test_three_queries_enumerated_by_hand():
    # 3 images, one hit at R@1 (image 0): a resample's R@1 is 100 k / 3 with k ~ Binomial(3, 1/3):
    # P(k=0) = 8/27, P(1) = 12/27, P(2) = 6/27, P(3) = 1/27. So P(k <= 2) = 26/27 = 0.963:
    # 95% interval [0, 100] (0.975 > 0.963), 90% interval [0, 66.67] (0.95 < 0.963).
    r = one_per_image([0, 7, 9], [0, 7, 9])
    s95 = BootstrapSettings(replicates=20000, seed=1)
    assert bootstrap_intervals(r, s95)["i2t_r1"] == [0.0, 100.0]
    s90 = BootstrapSettings(replicates=20000, seed=1, level=0.90)
    lo, hi = bootstrap_intervals(r, s90)["t2i_r1"]
    assert lo == 0.0 and hi == pytest.approx(200 / 3)
    # the replicates follow the multinomial law: frequencies of k = 0..3 near 8, 12, 6, 1 /27
    reps = bootstrap_replicates(r, s95)["i2t_r1"]
    freq = np.array([np.mean(np.isclose(reps, 100 * k / 3)) for k in range(4)])
    np.testing.assert_allclose(freq, np.array([8, 12, 6, 1]) / 27, atol=0.015)


def test_captions_are_resampled_with_their_image():
    # image 0: both captions hit; image 1: both miss. Any resample has t2i R@1 in {0, 50, 100}
    # with the probabilities of the images (1/4, 1/2, 1/4): captions never split from their image
    r = QueryRanks(np.array([0, 5]), np.array([0, 0, 5, 5]), np.array([0, 0, 1, 1]))
    reps = bootstrap_replicates(r, BootstrapSettings(replicates=8000, seed=3))["t2i_r1"]
    assert set(np.unique(reps)) <= {0.0, 50.0, 100.0}
    np.testing.assert_allclose([np.mean(reps == v) for v in (0, 50, 100)], [0.25, 0.5, 0.25], atol=0.02)


def test_fixed_seed_reproduces_and_other_seed_differs():
    rng = np.random.default_rng(0)
    r = QueryRanks(rng.integers(0, 30, 50), rng.integers(0, 30, 250), np.repeat(np.arange(50), 5))
    a = bootstrap_intervals(r, BootstrapSettings(replicates=300, seed=5))
    assert a == bootstrap_intervals(r, BootstrapSettings(replicates=300, seed=5))
    assert a != bootstrap_intervals(r, BootstrapSettings(replicates=300, seed=6))
    # the point estimate lies inside its interval, and the interval is not degenerate here
    pt = point_recalls(r)
    for m in INTERVAL_METRICS:
        assert a[m][0] <= pt[m] <= a[m][1] and a[m][0] < a[m][1], m


def test_paired_identical_models_is_exactly_zero_and_shift_is_seen():
    rng = np.random.default_rng(1)
    mapping = np.repeat(np.arange(40), 5)
    a = QueryRanks(rng.integers(0, 20, 40), rng.integers(0, 20, 200), mapping)
    d = paired_difference(a, QueryRanks(a.i2t.copy(), a.t2i.copy(), mapping), BootstrapSettings(replicates=500))
    assert all(d[m] == {"diff": 0.0, "low": 0.0, "high": 0.0} for m in INTERVAL_METRICS)
    # b hits at rank 0 everywhere a does not: b - a is positive in every resample with any miss
    b = QueryRanks(np.zeros(40, int), np.zeros(200, int), mapping)
    d = paired_difference(b, a, BootstrapSettings(replicates=500))
    assert d["rsum"]["low"] > 0 and d["rsum"]["diff"] == pytest.approx(
        point_recalls(b)["rsum"] - point_recalls(a)["rsum"]
    )


def test_paired_refuses_different_queries():
    a = one_per_image([0, 1], [0, 1])
    b = one_per_image([0, 1, 2], [0, 1, 2])
    with pytest.raises(RetrievalInputError, match="same queries"):
        paired_difference(a, b)


def test_folds_resampled_within_each_fold_and_points_match_protocol():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(10, 4)).astype(np.float32)
    txt = np.repeat(img, 2, axis=0) + rng.normal(scale=0.8, size=(20, 4)).astype(np.float32)
    from d2s.retrieval import Protocol

    res = evaluate_protocol(Protocol("toy_2fold", "test: 2 folds of 5 images", 10, 2), img, txt)
    r = QueryRanks(res.ranks.i2t, res.ranks.t2i, res.txt_to_img, res.n_folds)
    pt = point_recalls(r)
    for m in INTERVAL_METRICS:  # point recalls from the kept ranks = the protocol's fold average
        assert pt[m] == pytest.approx(getattr(res.metrics, m)), m
    # fold 0 all hits, fold 1 all misses at R@1: every replicate is exactly (100 + 0) / 2
    r2 = QueryRanks(np.r_[np.zeros(5, int), np.full(5, 3)], np.r_[np.zeros(10, int), np.full(10, 3)], r.txt_to_img, 2)
    assert bootstrap_intervals(r2, BootstrapSettings(replicates=100))["i2t_r1"] == [50.0, 50.0]


def test_points_unchanged_and_intervals_in_results():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(30, 8)).astype(np.float32)
    txt = np.repeat(img, 5, axis=0) + rng.normal(scale=1.5, size=(150, 8)).astype(np.float32)
    import torch

    emb = Embeddings(torch.from_numpy(img), torch.from_numpy(txt), torch.arange(150) // 5)
    res = evaluate_embeddings(emb, RetrievalSettings(bootstrap=200))["custom"]
    ranks = evaluate_protocol("custom", img, txt)
    assert res.metrics == metrics_from_ranks(ranks.ranks.i2t, ranks.ranks.t2i)  # points exactly as before
    assert res.bootstrap["replicates"] == 200 and res.bootstrap["level"] == 0.95
    assert set(res.intervals) == set(INTERVAL_METRICS)
    assert res.intervals["rsum"][0] <= res.metrics.rsum <= res.intervals["rsum"][1]
    assert evaluate_embeddings(emb, RetrievalSettings(bootstrap=0))["custom"].intervals == {}
    with pytest.raises(RetrievalInputError, match="level"):
        RetrievalSettings(interval_level=1.5)


def test_large_case_is_vectorised_in_blocks():
    # more replicates x images than one block holds: still the multinomial law (R@1 mean = point)
    n = 5000
    r = QueryRanks(np.arange(n) % 2, np.arange(n) % 2, np.arange(n))
    reps = bootstrap_replicates(r, BootstrapSettings(replicates=1200, seed=0))["i2t_r1"]
    assert reps.shape == (1200,) and abs(reps.mean() - 50.0) < 0.1
    assert math.isclose(reps.std(), 100 * math.sqrt(0.25 / n), rel_tol=0.1)
