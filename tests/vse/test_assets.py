"""The assets' tokenizer vocabulary: words split exactly as the BERT tokenizer built from it splits them."""

from __future__ import annotations

import io

from PIL import Image

from d2s.schema import DenseText, Sample
from d2s.shards import ShardWriter, write_manifest
from vse.assets import SPECIAL, build_tokenizer, collect_vocab

CAPTIONS = [
    "Café naïve Über",
    "A crème brûlée at the Zürich café, naïvely priced at 5€!",
    "Ça coûte 10$ — señor Ångström's façade (déjà vu)",
    "北京 and tōkyō: 東京",
]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return buf.getvalue()


def _shards(root, captions: list[str], dense: str):
    with ShardWriter(root, "train", 0) as w:
        for i, cap in enumerate(captions):
            w.write(
                Sample(
                    key=f"{i:04d}",
                    image=_png(),
                    image_ext="png",
                    id=f"img{i}",
                    dataset="unit",
                    split="train",
                    sparse=[cap],
                    dense=[DenseText(dense, source="unit")],
                )
            )
    write_manifest(root)
    return root


def test_every_token_of_a_non_ascii_corpus_is_in_the_vocabulary(tmp_path):
    """The vocabulary is counted with the tokenizer's own normaliser and pre-tokenizer: no word of
    the corpus becomes [UNK] (a regex split kept "caf" + "é" while BERT's normaliser gives "cafe")."""
    shards = _shards(tmp_path / "w", CAPTIONS, "Über das Café: naïve Straße")
    words = collect_vocab(shards)
    tok = build_tokenizer(words, tmp_path / "tok")
    for text in [*CAPTIONS, "Über das Café: naïve Straße"]:
        tokens = tok.tokenize(text)
        assert tokens and "[UNK]" not in tokens, (text, tokens)
        assert [t for t in tokens if t not in tok.get_vocab()] == []
    assert {"cafe", "naive", "uber", "creme", "brulee", "zurich", "angstrom", "北", "京"} <= set(words)


def test_ascii_vocabulary_order_is_sorted_words_after_the_specials(tmp_path):
    shards = _shards(tmp_path / "w", ["a red cube, left of the blue ball.", "the big_red cube's x+y=2"], "two cubes")
    words = collect_vocab(shards)
    assert words == sorted(words)
    assert words == sorted(set(words)) and "big" in words and "_" in words and "'" in words and "+" in words
    vocab = build_tokenizer(words, tmp_path / "tok").get_vocab()
    assert [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == SPECIAL + words
