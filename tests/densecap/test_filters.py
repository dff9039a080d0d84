"""Filters on crafted bad captions: each reason, counters, and per-shard near-duplicate state."""

from __future__ import annotations

import pytest

from d2s.schema import DenseText, Sample
from densecap.filters import DEFAULT_FILTERS, FILTERS, FilterChain

SPARSE = ["a red car parked next to a tall building", "a car on a quiet street"]
GOOD = (
    "A red car is parked on a quiet street next to a tall grey building. Two people walk past the car "
    "on the pavement, and a row of green trees lines the far side of the street under a pale sky."
)


def sample(sparse=SPARSE):
    return Sample("k", b"x", "png", "id", "d", "train", sparse=list(sparse))


def chain(**overrides):
    return FilterChain([FILTERS.create(n, overrides.get(n, {}), n) for n in DEFAULT_FILTERS])


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD, "keep"),
        ("A red car.", "too_short"),
        (" ".join(["word"] * 5 + ["car", "street"] * 300), "too_long"),
        ("The red car is on the street and " * 6, "repetition"),
        ("The car car car car is red and parked on a quiet street near a tall building.", "repetition"),
        ("I'm sorry, but I cannot see the image. Could you describe the red car on the street for me?", "refusal"),
        ("As an AI language model I can say this street has a red car parked near a building.", "refusal"),
        ("lar}\x0b d\ufffd\ufffd window\ufffd ietos %% ## @@ 0x33 ;; ~~ \x04\ufffd Hos ^^ car street", "garbage"),
        ("Красная машина стоит на тихой улице рядом с высоким серым зданием и деревьями car street.", "garbage"),
        (
            "A wooden table holds a bowl of oranges, a teapot and two cups, with a window behind it showing hills.",
            "ungrounded",
        ),
    ],
)
def test_each_reason(text, reason):
    ch = chain()
    d = DenseText(text, "test")
    assert ch.apply(d, sample()) == reason, d.scores
    assert d.verdict == reason and ch.counts[reason] == 1
    assert "words" in d.scores


def test_near_duplicate_within_a_shard_and_reset():
    ch = chain()
    s = sample()
    first = DenseText(GOOD, "t")
    again = DenseText(GOOD.replace("Two people", "Three people"), "t")
    assert ch.apply(first, s) == "keep"
    assert ch.apply(again, s) == "near_duplicate" and again.scores["near_dup_similarity"] >= 0.8
    ch.reset()  # a new shard starts with a clean slate: verdicts do not depend on shard order
    assert ch.apply(DenseText(GOOD, "t"), s) == "keep"
    assert ch.counts == {"keep": 2, "near_duplicate": 1}


def test_dropped_caption_is_not_remembered_by_near_duplicate():
    ch = chain()
    bad = "I'm sorry, I cannot describe " + GOOD
    assert ch.apply(DenseText(bad, "t"), sample()) == "refusal"
    assert ch.apply(DenseText(GOOD, "t"), sample()) == "keep"


def test_grounding_passes_without_sparse_and_thresholds_are_params():
    other = "A wooden table holds a bowl of oranges, a teapot and two cups, with a window behind it showing hills."
    assert chain().apply(DenseText(other, "t"), sample(sparse=[])) == "keep"
    assert chain(grounding={"min_overlap": 0.0}).apply(DenseText(other, "t"), sample()) == "keep"
    assert chain(length={"min_words": 50}).apply(DenseText(GOOD, "t"), sample()) == "too_short"


def test_errors_are_not_filtered():
    ch = chain()
    d = DenseText("", "t", error="HTTP 500", verdict="error")
    assert ch.apply(d, sample()) == "error" and ch.counts["error"] == 1


def test_refusal_extra_patterns_and_bad_params():
    f = FILTERS.create("refusal", {"extra_patterns": [r"\bhere is a description\b"]}, "refusal")
    assert f.check(DenseText("Here is a description of a car.", "t"), sample()) == "refusal"
    from d2s.config import ConfigError

    with pytest.raises(ConfigError, match=r"filters\[0\].params.min_words"):
        FILTERS.create("length", {"min_words": "many"}, "filters[0].params")
    with pytest.raises(ConfigError, match="unknown filter 'nope'"):
        FILTERS.get("nope")
