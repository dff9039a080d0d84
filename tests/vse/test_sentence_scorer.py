"""The sentence-scorer recipe: generic hard-negative edits, InfoNCE with extra negatives, and a
short real training run that produces a bundle the vse-bundle scorer can load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vse_train.losses import infonce_loss
from vse_train.recipes import get_recipe
from vse_train.text_edits import batch_words, edit_sentence

# ---- edits ----------------------------------------------------------------------------

BATCH = [
    "At the top left there is a small red star.",
    "At the bottom right there is a large blue ring.",
    "A green tree stands near 3 cars and 4 dogs.",
    "The red star is above the blue ring.",
]


def _edits(sentence, batch=BATCH, n=300):
    rng = np.random.default_rng(0)
    seen = batch_words(batch)
    return {edit_sentence(sentence, rng, seen) for _ in range(n)}


def test_batch_words():
    seen = batch_words(BATCH)
    assert seen.colors == ["blue", "green", "red"]
    assert seen.numbers == ["3", "4"]
    assert seen.objects == ["ring", "star", "tree"]


def test_each_edit_changes_one_word_into_a_word_the_batch_uses():
    s = "At the top left there is a small red star."
    out = _edits(s)
    assert None not in out
    for e in out:
        a, b = s.split(), e.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert out == {
        "At the bottom left there is a small red star.",  # position: its opposite, used in the batch
        "At the top right there is a small red star.",
        "At the top left there is a large red star.",  # size
        "At the top left there is a small blue star.",  # colour: only colours the batch uses
        "At the top left there is a small green star.",
        "At the top left there is a small red ring.",  # object name
        "At the top left there is a small red tree.",
    }


def test_numbers_swaps_and_unseen_opposites():
    out = _edits("The red star is above the blue ring.")
    # 'below' is not in the batch: 'above' is left alone; the two objects may be exchanged
    assert "The red ring is above the blue star." in out
    assert not any("below" in e for e in out)
    assert "A green tree stands near 4 cars and 4 dogs." in _edits("A green tree stands near 3 cars and 4 dogs.")


def test_case_is_kept_and_a_sentence_without_editable_words_gives_none():
    assert _edits("Red things.") == {"Blue things.", "Green things."}
    assert _edits("A nice day at the beach.") == {None}
    assert _edits("A red star.", batch=["A red star."]) == {None}  # nothing else to put in


# ---- loss -----------------------------------------------------------------------------


def test_infonce_extra_negatives_by_hand():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=1)
    neg = F.normalize(torch.tensor([[0.9, 0.1], [0.3, 1.0]]), dim=1)
    t = 0.5
    got = infonce_loss(img, txt, None, t, "mean", extra_txt=neg)
    s, sn = ((img @ txt.T) / t).tolist(), ((img @ neg.T) / t).tolist()
    i2t = [
        -s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(2)) + sum(math.exp(sn[i][j]) for j in range(2)))
        for i in range(2)
    ]
    t2i = [-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(2))) for j in range(2)]
    assert got.item() == pytest.approx((sum(i2t) / 2 + sum(t2i) / 2) / 2, rel=1e-5)
    # extra negatives make the task harder: the loss grows
    assert got.item() > infonce_loss(img, txt, None, t, "mean").item()


def test_only_losses_with_hard_negatives_take_a_third_input():
    from d2s.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="third input"):
        get_recipe({"losses": [{"kind": "triplet", "inputs": ["image", "sentence", "sentence_negative"]}]})
    r = get_recipe("sentence-scorer")
    assert r.needs_dense and r.losses[0].inputs == ["image", "sentence", "sentence_negative"]


# ---- collate and a real run -------------------------------------------------------------


def test_collate_draws_a_sentence_of_the_dense_text_and_its_edit(world, assets):
    from d2s.grounding import split_sentences
    from d2s.shards import iter_samples, split_shards
    from vse.checkpoint import load_tokenizer
    from vse.models import TokenAugConfig
    from vse.transforms import ImageTransform, TextTokenizer
    from vse_train.data import Collate, TextField, _dense_texts

    samples = [s for _, s in zip(range(16), iter_samples(split_shards(world, "train")))]
    texts = _dense_texts(samples, "sentence", np.random.default_rng(0))
    for s, sent, neg in zip(samples, texts["sentence"], texts["sentence_negative"]):
        assert sent in split_sentences(s.dense[0].text)
        assert neg != sent
    edited = sum(len(a.split()) == len(b.split()) for a, b in zip(texts["sentence"], texts["sentence_negative"]))
    assert edited >= 14  # nearly every sentence of the world has a colour, size, position or number
    tok = TextTokenizer(load_tokenizer(assets))
    collate = Collate(
        ImageTransform(32, [0.5] * 3, [0.5] * 3),
        tok,
        {"sentence": TextField("sentence", 48, False), "sentence_negative": TextField("sentence_negative", 48, False)},
        TokenAugConfig(),
    )
    batch = collate(samples, [0, 0, 0])
    assert batch["sentence_ids"].shape[0] == 16 and batch["sentence_negative_ids"].shape[0] == 16


@pytest.mark.slow
def test_sentence_scorer_recipe_trains_and_exports_a_bundle(world, assets, tmp_path):
    from d2s.grounding import SCORERS
    from vse_train.config import parse_config
    from vse_train.train import train

    from .test_train import cfg_doc

    s = train(parse_config(cfg_doc(world, assets, tmp_path / "run", recipe="sentence-scorer", steps=4)))
    assert s["steps"] == 4 and math.isfinite(s["last_loss"])
    bundle = tmp_path / "run" / "bundle"
    from vse.bundle import export_bundle

    if not bundle.exists():
        export_bundle(tmp_path / "run" / "checkpoint", bundle)
    scorer = SCORERS.create("vse-bundle", {"path": str(bundle), "progress": False}, "scorer")
    assert scorer.embed_texts(["A small red star."]).shape[0] == 1
