"""d2s.grounding: the sentence splitter, calibration on hand-made cases, the actions."""

from __future__ import annotations

import math

import pytest
import torch

from d2s.grounding import (
    SCORERS,
    GroundingAction,
    ReferenceBank,
    ScorerError,
    SentenceScorer,
    apply_action,
    calibrate,
    score_batch,
    split_sentences,
)
from d2s.schema import DenseText, Sample, Sentence

# ---- splitter -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   \n ", []),
        ("no final stop", ["no final stop"]),
        (
            "Dr. Smith has 3.5 kg of apples. He sold them at 10 a.m. to Mr. Jones!",
            ["Dr. Smith has 3.5 kg of apples.", "He sold them at 10 a.m. to Mr. Jones!"],
        ),
        ("It costs $4.99 vs. 5.00 in the U.S. today. Next.", ["It costs $4.99 vs. 5.00 in the U.S. today.", "Next."]),
        ("It sits at approx. 3 cm. It is red.", ["It sits at approx. 3 cm.", "It is red."]),
        (
            "There are objects (a star, a ring, etc.) here. The end.",
            ["There are objects (a star, a ring, etc.) here.", "The end."],
        ),
        (
            "**Objects:** 1. A red star. 2. A blue ring.",
            ["**Objects:**", "1. A red star.", "2. A blue ring."],
        ),
        ("The image shows:\n- a cat\n- a dog\n* a bird", ["The image shows:", "- a cat", "- a dog", "* a bird"]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("Wait... what? OK!", ["Wait... what?", "OK!"]),
    ],
)
def test_split_sentences_edge_cases(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_synthetic_description():
    from d2s.synthetic import describe

    scene = {
        "scene_type": "beach",
        "background": "sand",
        "texture": "plain",
        "grid": 3,
        "objects": [
            {"shape": "star", "color": "red", "size": "small", "row": 0, "col": 0},
            {"shape": "ring", "color": "blue", "size": "large", "row": 1, "col": 0},
        ],
    }
    assert split_sentences(describe(scene)) == [
        "A beach scene on a plain sand background with 2 objects.",
        "At the top left there is a small red star.",
        "At the left there is a large blue ring.",
        "The small red star is above the large blue ring.",
    ]


# ---- calibration --------------------------------------------------------------------


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_calibration_hand_made():
    # bank of 4 reference images; cosines of the text with them: 0, 0.6, 0, 0.8 -> mean 0.35,
    # sample std sqrt(((-.35)^2 + .25^2 + (-.35)^2 + .45^2) / 3) = sqrt(0.51/3) = 0.41231
    bank = ReferenceBank(_unit([1, 0, 0], [0.8, 0.6, 0], [1, 0, 0], [0.6, 0.8, 0]), ["a", "b", "c", "d"])
    text = _unit([0, 1, 0])
    own = _unit([0, 1, 0])  # a perfect match: cosine 1
    score, sim = calibrate(text, own, bank, ["x"])
    assert sim.item() == pytest.approx(1.0)
    assert score.item() == pytest.approx((1.0 - 0.35) / math.sqrt(0.51 / 3), rel=1e-4)


def test_calibration_leaves_own_image_out_of_the_bank():
    bank = ReferenceBank(_unit([1, 0], [0, 1], [0.6, 0.8]), ["a", "b", "own"])
    text = _unit([0, 1])
    own = _unit([0.6, 0.8])
    with_own, _ = calibrate(text, own, bank, ["own"])
    # by hand, bank without "own": cosines 0 and 1 -> mean 0.5, std sqrt(0.5)
    assert with_own.item() == pytest.approx((0.8 - 0.5) / math.sqrt(0.5), rel=1e-4)
    as_other, _ = calibrate(text, own, bank, ["zzz"])
    assert as_other.item() != pytest.approx(with_own.item())


def _at_cosine(c):
    """A unit vector in 2-d whose cosine with [1, 0] is c."""
    return [c, math.sqrt(1 - c * c)]


def test_a_sentence_as_close_to_every_image_scores_zero_and_scale_does_not_matter():
    text = _unit([1, 0])
    # generic: its own image is as close as the references are on average (0.8 vs 0.9 / 0.7)
    bank = ReferenceBank(_unit(_at_cosine(0.9), _at_cosine(0.7)), ["a", "b"])
    score, sim = calibrate(text, _unit(_at_cosine(0.8)), bank, ["x"])
    assert sim.item() == pytest.approx(0.8, abs=1e-5) and score.item() == pytest.approx(0.0, abs=1e-3)
    # the same margin over the references gives the same score whether the cosines are
    # small (0.4 against 0.1 / 0.3) or large (1.0 against 0.7 / 0.9): (0.2) / std 0.1414
    small, _ = calibrate(
        text, _unit(_at_cosine(0.4)), ReferenceBank(_unit(_at_cosine(0.1), _at_cosine(0.3)), ["a", "b"]), ["x"]
    )
    large, _ = calibrate(
        text, _unit(_at_cosine(1.0)), ReferenceBank(_unit(_at_cosine(0.7), _at_cosine(0.9)), ["a", "b"]), ["x"]
    )
    assert small.item() == pytest.approx(0.2 / math.sqrt(0.02), rel=1e-3)
    assert large.item() == pytest.approx(small.item(), rel=1e-3)


# ---- scoring through a scorer ----------------------------------------------------------


class _WordScorer(SentenceScorer):
    """A transparent test scorer: an image is its bytes' words, a text its words; the embedding
    is a bag of words over a fixed vocabulary (so expected scores can be worked out by hand)."""

    name = "test-words"
    VOCAB = ["red", "blue", "star", "ring", "sky", "sand", "bias"]

    def _bag(self, words):
        v = torch.tensor([float(w in words) for w in self.VOCAB]) + 1e-3
        return v / v.norm()

    def embed_images(self, images, keys):
        for im, k in zip(images, keys):
            if not im.startswith(b"img:"):
                raise ScorerError(f"key {k!r}: cannot decode image")
        return torch.stack([self._bag(im.decode()[4:].split()) for im in images])

    def embed_texts(self, texts):
        return torch.stack([self._bag(t.lower().rstrip(".").split()) for t in texts])


def _sample(key, words):
    return Sample(key=key, image=f"img:{words}".encode(), image_ext="png", id=key, dataset="t", split="train")


def test_score_batch_ranks_true_sentences_above_false_ones():
    scorer = _WordScorer()
    refs = [
        _sample(f"r{i}", w) for i, w in enumerate(["red star", "blue ring", "sky", "sand", "red ring", "blue star"])
    ]
    bank = ReferenceBank.build(scorer, refs, 6)
    s = _sample("x", "red star sky")
    d = DenseText("There is a red star. The sky. A blue ring.", "src")
    (scored,) = score_batch(scorer, bank, [(s, d)])
    assert [x.text for x in scored] == ["There is a red star.", "The sky.", "A blue ring."]
    true1, true2, false = (x.score for x in scored)
    assert min(true1, true2) > false


def test_score_batch_names_an_empty_caption_and_a_bad_image():
    scorer = _WordScorer()
    bank = ReferenceBank.build(scorer, [_sample("a", "red"), _sample("b", "blue")], 2)
    with pytest.raises(ScorerError, match=r"key 'x'.*empty"):
        score_batch(scorer, bank, [(_sample("x", "red"), DenseText("  ", "src"))])
    bad = Sample(key="y", image=b"\x00garbage", image_ext="png", id="y", dataset="t", split="train")
    with pytest.raises(ScorerError, match=r"key 'y'.*decode"):
        score_batch(scorer, bank, [(bad, DenseText("A red star.", "src"))])


def test_reference_bank_needs_two_images():
    with pytest.raises(ScorerError, match="at least 2"):
        ReferenceBank.build(_WordScorer(), [_sample("a", "red")], 10)


def test_registry_names_known_scorers_on_unknown_name():
    from d2s.config import ConfigError

    with pytest.raises(ConfigError, match="sentence scorer"):
        SCORERS.get("no-such-scorer")


# ---- actions ------------------------------------------------------------------------


def _scored(scores):
    return [Sentence(f"Sentence {i}.", s, 0.1 * i) for i, s in enumerate(scores)]


def test_repair_removes_unsupported_sentences_and_keeps_them():
    d = DenseText("Sentence 0. Sentence 1. Sentence 2.", "src")
    what = apply_action(d, _scored([2.0, 0.3, 1.5]), "scorer-x", GroundingAction("repair", threshold=1.0))
    assert what == "repaired"
    assert d.text == "Sentence 0. Sentence 2."
    assert d.original_text == "Sentence 0. Sentence 1. Sentence 2."
    assert [(s.text, s.score, s.removed) for s in d.sentences] == [
        ("Sentence 0.", 2.0, False),
        ("Sentence 1.", 0.3, True),
        ("Sentence 2.", 1.5, False),
    ]
    assert d.scorer == "scorer-x" and d.kept
    assert d.scores["unsupported_sentences"] == 1.0
    assert d.scores["grounding_score"] == pytest.approx((2.0 + 0.3 + 1.5) / 3, abs=1e-4)


def test_new_threshold_from_stored_scores_restores_first():
    d = DenseText("Sentence 0. Sentence 1. Sentence 2.", "src")
    apply_action(d, _scored([2.0, 0.3, 1.5]), "s", GroundingAction("repair", threshold=1.0))
    what = apply_action(d, d.sentences, "s", GroundingAction("repair", threshold=1.8))
    assert what == "repaired"
    assert d.text == "Sentence 0." and d.original_text == "Sentence 0. Sentence 1. Sentence 2."
    assert [s.removed for s in d.sentences] == [False, True, True]
    apply_action(d, d.sentences, "s", GroundingAction("score"))
    assert d.text == "Sentence 0. Sentence 1. Sentence 2." and d.original_text == ""
    assert not any(s.removed for s in d.sentences)


def test_repair_of_a_wholly_unsupported_caption_drops_it_and_drop_uses_the_mean():
    d = DenseText("Sentence 0. Sentence 1.", "src")
    assert apply_action(d, _scored([0.1, 0.2]), "s", GroundingAction("repair")) == "dropped"
    assert d.verdict == "unsupported" and d.text == "Sentence 0. Sentence 1."
    d2 = DenseText("Sentence 0. Sentence 1.", "src")
    assert apply_action(d2, _scored([3.0, 0.2]), "s", GroundingAction("drop", min_caption_score=1.5)) == "scored"
    assert d2.kept
    assert apply_action(d2, _scored([1.0, 0.2]), "s", GroundingAction("drop", min_caption_score=1.5)) == "dropped"
    assert d2.verdict == "unsupported"


def test_a_caption_dropped_by_a_filter_is_only_scored():
    d = DenseText("Sentence 0. Sentence 1.", "src", verdict="repetition")
    assert apply_action(d, _scored([0.1, 2.0]), "s", GroundingAction("repair")) == "scored"
    assert d.verdict == "repetition" and d.text == "Sentence 0. Sentence 1." and len(d.sentences) == 2


def test_pooled_calibration_shares_one_spread_and_none_is_the_cosine():
    # bank cosines: sentence A {0.1, 0.3} (mean 0.2), sentence B {0.7, 0.9} (mean 0.8); pooled
    # variance over both sentences' deviations: (4 * 0.1^2) / (1 + 1) = 0.02
    bank = ReferenceBank(_unit(_at_cosine(0.1), _at_cosine(0.3)), ["a", "b"])
    text = _unit([1, 0])
    score, _ = calibrate(text, _unit(_at_cosine(0.5)), bank, ["x"], "pooled")
    assert score.item() == pytest.approx(0.3 / math.sqrt(0.02), rel=1e-3)  # one sentence: its own spread
    bank2 = ReferenceBank(_unit([1, 0, 0], [0, 1, 0]), ["a", "b"])
    texts = _unit([1, 1, 0], [1, 0, 0])  # cosines with the bank: (.7071, .7071) and (1, 0)
    own = _unit([1, 1, 1], [0, 0, 1])
    pooled, sim = calibrate(texts, own, bank2, ["x", "y"], "pooled")
    dev = [0.0, 0.0, 0.5, -0.5]  # deviations from each sentence's mean over the bank
    spread = math.sqrt(sum(d * d for d in dev) / 2)
    s0, s1 = sim.tolist()
    assert pooled.tolist() == pytest.approx([(s0 - 0.7071) / spread, (s1 - 0.5) / spread], rel=1e-3)
    raw, sim2 = calibrate(texts, own, bank2, ["x", "y"], "none")
    assert raw.tolist() == pytest.approx(sim2.tolist()) and sim2[1].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="calibration"):
        calibrate(texts, own, bank2, ["x", "y"], "bogus")
