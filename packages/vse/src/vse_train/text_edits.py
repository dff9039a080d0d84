"""Generic hard negatives for sentence-level alignment: one small edit that makes a sentence false.

The ``sentence-scorer`` recipe aligns images with single sentences of their dense text and
shows the model, next to each sentence, the same sentence with one word changed, as NegCLIP
and FG-CLIP do for attributes and relations. The edits are generic English word swaps:

- a colour word for another colour word;
- a size word for its opposite (small / large, tall / short, ...);
- a position or relation word for its opposite (left / right, top / bottom, above / below, ...);
- a number for another number (words or digits);
- an object name for another object name of the batch, or two object names of the sentence
  exchanged. Object names are found the generic way: a word that follows a colour or size word
  somewhere in the batch ("a red *car*").

A word is only put in when the batch's sentences use it too (``BatchWords``): a negative
given away by a word the model never saw teaches nothing.

They know nothing of how the synthetic world writes its descriptions or of the
``synthetic-errors`` caption source, whose planted errors the grounding benchmark measures
(docs/grounding.md): a scorer trained on those errors would be graded on its own exam.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLORS = (
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white", "gray",
    "grey", "cyan", "magenta", "beige", "gold", "silver", "turquoise", "navy",
)  # fmt: skip
_PAIRS = {
    "size": [("small", "large"), ("big", "small"), ("little", "big"), ("tiny", "huge"), ("tall", "short"),
             ("thin", "thick"), ("narrow", "wide"), ("long", "short")],
    "position": [("left", "right"), ("top", "bottom"), ("above", "below"), ("upper", "lower"), ("over", "under"),
                 ("front", "back"), ("inside", "outside"), ("near", "far"), ("before", "after")],
}  # fmt: skip
SWAPS: dict[str, dict[str, str]] = {
    kind: {**{a: b for a, b in pairs}, **{b: a for a, b in pairs if b not in {x for x, _ in pairs}}}
    for kind, pairs in _PAIRS.items()
}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
KINDS = ("color", "size", "position", "number", "object", "swap")

_WORD = re.compile(r"[A-Za-z]+|\d+")


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


@dataclass
class BatchWords:
    """The words a batch's sentences use, by kind: an edit only puts in a word the corpus itself
    uses, so that a negative is never given away by a word the model has never seen."""

    words: set[str]
    colors: list[str]
    numbers: list[str]
    objects: list[str]


def batch_words(sentences: Sequence[str]) -> BatchWords:
    """Colour words, numbers and object names (a word that follows a colour or size word:
    "a red *car*") of ``sentences``."""
    adjectives = set(COLORS) | set(SWAPS["size"])
    words, objects = set(), set()
    for s in sentences:
        ws = [w.lower() for w in _WORD.findall(s)]
        words.update(ws)
        for a, b in zip(ws, ws[1:]):
            if a in adjectives and b.isalpha() and b not in adjectives:
                objects.add(b)
    colors = sorted(w for w in words if w in COLORS)
    numbers = sorted(w for w in words if w in NUMBERS or w.isdigit())
    return BatchWords(words, colors, numbers, sorted(objects))


def _candidates(words: list[re.Match], seen: BatchWords) -> list[tuple[int, str]]:
    """(word index, edit kind) for every word an edit can change."""
    out = []
    objects_here = [i for i, m in enumerate(words) if m.group().lower() in seen.objects]
    for i, m in enumerate(words):
        w = m.group().lower()
        if w in COLORS and len(seen.colors) > 1:
            out.append((i, "color"))
        elif w in SWAPS["size"] and SWAPS["size"][w] in seen.words:
            out.append((i, "size"))
        elif w in SWAPS["position"] and SWAPS["position"][w] in seen.words:
            out.append((i, "position"))
        elif (w in NUMBERS or w.isdigit()) and len(seen.numbers) > 1:
            out.append((i, "number"))
        elif i in objects_here and len(seen.objects) > 1:
            out.append((i, "object"))
    if len({words[i].group().lower() for i in objects_here}) > 1:
        out.append((objects_here[0], "swap"))
    return out


def _replacement(word: str, kind: str, rng: np.random.Generator, seen: BatchWords) -> str:
    w = word.lower()
    if kind in ("size", "position"):
        return SWAPS[kind][w]
    pool = {"color": seen.colors, "number": seen.numbers, "object": seen.objects}[kind]
    return str(rng.choice([x for x in pool if x != w]))


def _swap_objects(sentence: str, words: list[re.Match], seen: BatchWords) -> str:
    """The first two different object names of the sentence exchanged ("the red star above the
    blue ring" -> "the red ring above the blue star")."""
    objs = [m for m in words if m.group().lower() in seen.objects]
    a = objs[0]
    b = next(m for m in objs[1:] if m.group().lower() != a.group().lower())
    return (
        sentence[: a.start()] + _match_case(b.group().lower(), a.group()) + sentence[a.end() : b.start()]
        + _match_case(a.group().lower(), b.group()) + sentence[b.end() :]
    )  # fmt: skip


def edit_sentence(sentence: str, rng: np.random.Generator, seen: BatchWords) -> str | None:
    """``sentence`` with one word changed (or two object names exchanged) so that it no longer
    says the same thing: a kind drawn at random among those that apply, then a word of that
    kind; None if no edit applies."""
    words = list(_WORD.finditer(sentence))
    cands = _candidates(words, seen)
    if not cands:
        return None
    kinds = sorted({k for _, k in cands}, key=KINDS.index)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "swap":
        return _swap_objects(sentence, words, seen)
    picks = [i for i, k in cands if k == kind]
    m = words[picks[int(rng.integers(len(picks)))]]
    new = _match_case(_replacement(m.group(), kind, rng, seen), m.group())
    return sentence[: m.start()] + new + sentence[m.end() :]
