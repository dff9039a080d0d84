"""d2s.retrieval against brute-force per-query sorts, on random and adversarial inputs."""

import numpy as np
import pytest
import torch

from d2s.retrieval import (
    PROTOCOLS,
    RetrievalInputError,
    RetrievalMetrics,
    evaluate_protocol,
    faiss_ranks,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
)
from tests.bench.reference import brute_metrics, brute_ranks, reference_loops

torch.set_num_threads(1)
TIES = ("stable", "optimistic", "pessimistic")


def int_emb(rng, n, d, lo=-2, hi=3):
    """Small-integer embeddings: dot products are exact in float32, and ties are frequent."""
    return rng.integers(lo, hi, size=(n, d)).astype(np.float32)


def check_all_paths(img, txt, mapping, ties, chunk_sizes=(1, 3, 7, 1024)):
    sim = img.astype(np.float64) @ txt.astype(np.float64).T
    bi, bt = brute_ranks(sim, mapping, ties)
    for cs in chunk_sizes:
        r = retrieval_ranks(img, txt, torch.as_tensor(mapping), chunk_size=cs, ties=ties)
        np.testing.assert_array_equal(r.i2t, bi, err_msg=f"i2t chunk={cs} ties={ties}")
        np.testing.assert_array_equal(r.t2i, bt, err_msg=f"t2i chunk={cs} ties={ties}")
        r2 = retrieval_ranks_from_similarity(sim, mapping, chunk_size=cs, ties=ties)
        np.testing.assert_array_equal(r2.i2t, bi)
        np.testing.assert_array_equal(r2.t2i, bt)
    m = retrieval_metrics(img, txt, torch.as_tensor(mapping), chunk_size=chunk_sizes[1], ties=ties)
    assert m.to_dict() == pytest.approx(brute_metrics(bi, bt))
    return bi, bt


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("seed", range(6))
def test_random_variable_captions_and_ties(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    counts = rng.integers(1, 7, size=n)
    mapping = np.repeat(np.arange(n), counts)
    if seed % 2:
        rng.shuffle(mapping)  # unsorted mapping: captions of an image scattered
    check_all_paths(int_emb(rng, n, 3), int_emb(rng, len(mapping), 3), mapping, ties)


@pytest.mark.parametrize("ties", TIES)
def test_duplicated_embeddings_and_all_equal(ties):
    rng = np.random.default_rng(1)
    img = int_emb(rng, 12, 4)
    img[5] = img[2]
    img[9] = img[2]  # three identical images
    txt = np.repeat(int_emb(rng, 12, 4), 5, axis=0)  # each image's 5 captions identical
    txt[7] = txt[30]  # a caption duplicated across images
    check_all_paths(img, txt, np.repeat(np.arange(12), 5), ties)
    # collapsed model: every score ties
    ones_i, ones_t = np.ones((10, 4), np.float32), np.ones((50, 4), np.float32)
    bi, bt = check_all_paths(ones_i, ones_t, np.repeat(np.arange(10), 5), ties)
    m = retrieval_metrics(ones_i, ones_t, chunk_size=4, ties=ties)
    if ties == "optimistic":
        assert m.rsum == 600
    elif ties == "pessimistic":
        assert m.i2t_r10 == 0 and m.t2i_r5 == 0 and m.t2i_medr == 10 and m.i2t_medr == 46
    else:
        assert m.i2t_r1 == 10 and m.t2i_r1 == 10  # only image 0 and its captions win ties


@pytest.mark.parametrize("ties", TIES)
def test_one_caption_per_image_and_float_data(ties):
    rng = np.random.default_rng(2)
    check_all_paths(int_emb(rng, 23, 5), int_emb(rng, 23, 5), np.arange(23), ties)
    # continuous float64 data (no ties): all rules agree
    img, txt = rng.normal(size=(37, 8)), rng.normal(size=(37 * 5, 8))
    bi, bt = check_all_paths(img, txt, np.repeat(np.arange(37), 5), ties, chunk_sizes=(5, 10, 36))


def test_matches_vsepp_reference_loops_and_default_mapping():
    rng = np.random.default_rng(3)
    ims, caps = int_emb(rng, 40, 6, -3, 4), int_emb(rng, 200, 6, -3, 4)
    ri, rt = reference_loops(ims, caps)
    r = retrieval_ranks(torch.from_numpy(ims), torch.from_numpy(caps), chunk_size=9)  # default mapping j // 5
    np.testing.assert_array_equal(r.i2t, ri)
    np.testing.assert_array_equal(r.t2i, rt)
    assert retrieval_metrics_from_similarity(ims @ caps.T, chunk_size=16) == metrics_from_ranks(ri, rt)


def test_metric_formulas_on_known_ranks():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 10]), np.array([0, 0, 2, 3]))
    assert m.i2t_r1 == 20 and m.i2t_r5 == 60 and m.i2t_r10 == 80
    assert m.t2i_r1 == 50 and m.t2i_r5 == 100 and m.t2i_r10 == 100
    assert m.rsum == pytest.approx(20 + 60 + 80 + 50 + 100 + 100)
    assert m.i2t_medr == 5 and m.i2t_meanr == pytest.approx(24 / 5 + 1)
    assert m.t2i_medr == 2 and m.t2i_meanr == pytest.approx(5 / 4 + 1)  # median 1.0 -> floor + 1
    assert RetrievalMetrics.from_dict(m.to_dict()) == m


@pytest.mark.slow
def test_coco_1k_fold_averaging_known_case():
    """5000 images in 5 folds; fold f is perfect for f < 2 and worst possible otherwise."""
    n = 1000
    # 1000 distinct unit vectors (32 dims: the [25000 x 5000] scores stay cheap); any two differ by
    # far more than rounding, so each one's score with itself (1) is strictly the highest
    v = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    img = np.concatenate([v] * 5)  # [5000, 32]
    good = np.repeat(v, 5, axis=0)  # caption j of image i is its image's vector: 1 on it, less elsewhere
    bad = -good  # every caption scores -1 on its image: strictly its lowest
    assert (v @ v.T - np.eye(n, dtype=np.float32)).max() < 0.9  # the margins the ranks rely on
    txt = np.concatenate([good, good, bad, bad, bad])
    res = evaluate_protocol("coco_1k_5fold", img, txt, chunk_size=300)
    assert len(res.folds) == 5
    assert [f.i2t_r1 for f in res.folds] == [100, 100, 0, 0, 0]
    assert res.metrics.i2t_r1 == pytest.approx(40) and res.metrics.t2i_r10 == pytest.approx(40)
    assert res.metrics.rsum == pytest.approx(240)
    # worst folds: the positive at -1 below 999 others -> rank 999 (1-based 1000)
    assert res.metrics.t2i_medr == pytest.approx((1 + 1 + 1000 * 3) / 5)
    assert res.metrics == RetrievalMetrics.mean(res.folds)
    # the 5K protocol on the same data is not the same number
    assert evaluate_protocol("coco_5k", img, txt, chunk_size=700).metrics.i2t_r1 != res.metrics.i2t_r1


def test_protocols_check_sizes():
    rng = np.random.default_rng(4)
    img, txt = int_emb(rng, 10, 4), int_emb(rng, 50, 4)
    assert set(PROTOCOLS) >= {"coco_1k_5fold", "coco_5k", "f30k_1k", "custom", "long_text"}
    with pytest.raises(RetrievalInputError, match="expects 1000 images, got 10"):
        evaluate_protocol("f30k_1k", img, txt)
    with pytest.raises(RetrievalInputError, match="one text per image"):
        evaluate_protocol("long_text", img, txt)
    with pytest.raises(RetrievalInputError, match="unknown protocol"):
        evaluate_protocol("coco_2k", img, txt)
    r = evaluate_protocol("long_text", img, txt[:10])
    assert r.n_texts == 10 and r.curves["i2t"][100] == 100.0
    c = evaluate_protocol("custom", img, txt, chunk_size=3)
    assert c.metrics == retrieval_metrics(img, txt)


def test_bad_inputs_give_clear_errors():
    rng = np.random.default_rng(5)
    img, txt = int_emb(rng, 4, 3), int_emb(rng, 20, 3)
    with pytest.raises(RetrievalInputError, match="not a multiple of 4 images"):
        retrieval_metrics(img, txt[:19])
    with pytest.raises(RetrievalInputError, match="dims differ"):
        retrieval_metrics(img, txt[:, :2])
    bad = img.copy()
    bad[2, 1] = np.nan
    with pytest.raises(RetrievalInputError, match=r"img_emb: 1 row\(s\) contain NaN or inf \(first: row 2\)"):
        retrieval_metrics(bad, txt)
    badt = txt.copy()
    badt[7, 0] = np.inf
    with pytest.raises(RetrievalInputError, match="txt_emb.*row 7"):
        retrieval_metrics(img, badt)
    with pytest.raises(RetrievalInputError, match="empty set"):
        retrieval_metrics(img[:0], txt)
    with pytest.raises(RetrievalInputError, match="empty set"):
        retrieval_metrics(img, txt[:0])
    with pytest.raises(RetrievalInputError, match="text 3 points at image 9, but there are only 4 images"):
        retrieval_metrics(img, txt[:5], torch.tensor([0, 1, 2, 9, 3]))
    with pytest.raises(RetrievalInputError, match="image 3 has no text"):
        retrieval_metrics(img, txt[:5], torch.tensor([0, 1, 2, 2, 1]))
    with pytest.raises(RetrievalInputError, match=r"expected shape \[5\]"):
        retrieval_metrics(img, txt[:5], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RetrievalInputError, match="2-D"):
        retrieval_metrics(img[0], txt)
    with pytest.raises(RetrievalInputError, match="ties"):
        retrieval_metrics(img, txt, ties="random")
    with pytest.raises(RetrievalInputError, match="overflowed"):
        retrieval_metrics(np.full((2, 2), 1e30, np.float32), np.full((2, 2), 1e30, np.float32))


def test_faiss_flat_matches_exact_recalls():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    img, txt = rng.normal(size=(60, 16)).astype(np.float32), rng.normal(size=(300, 16)).astype(np.float32)
    txt[::5] += 2 * np.repeat(img, 1, axis=0)  # make retrieval non-trivial
    exact = retrieval_ranks(img, txt)
    approx = faiss_ranks(img, txt, k=20)
    for name in ("i2t", "t2i"):
        e, a = getattr(exact, name), getattr(approx, name)
        np.testing.assert_array_equal(np.minimum(e, 20), a)
