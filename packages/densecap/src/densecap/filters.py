"""Caption filters: each one keeps a dense text or drops it with a reason.

A filter computes its scores (stored in ``DenseText.scores``, so thresholds can be
audited later) and returns ``None`` to keep or a reason string to drop. Filters run in the
configured order and the first failing one sets ``DenseText.verdict`` (later ones do not
run, so a stateful filter never remembers a dropped caption); dropped texts stay in the sample and go to the rejects file too.
Filters see one shard's captions in order, so their state (near-duplicates) is per
shard: a resumed or re-split run gives the same verdicts.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from d2s.registry import PluginRegistry
from d2s.schema import DenseText, Sample

FILTERS: PluginRegistry[Filter] = PluginRegistry("filter", "densecap.filters")

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)

STOPWORDS = frozenset(
    """a an the and or but of in on at to from with without by for as is are was were be been being this that
    these those there here it its it's into onto over under above below near next left right top bottom middle
    center centre side front back behind between some any each every one two three four five several many few
    very also has have had having do does did can could may might will would shall should not no while which who
    whom whose what where when how image picture photo shows showing shown scene appears appear visible see seen
    can we you they he she his her their our your i me my""".split()
)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> set[str]:
    out = set()
    for w in words(text):
        if w in STOPWORDS or len(w) < 3 or w.isdigit():
            continue
        out.add(w[:-1] if w.endswith("s") and len(w) > 4 else w)  # crude plural folding
    return out


class Filter:
    """Base class: set ``Params`` and implement ``check``; call ``reset`` at each shard."""

    name: ClassVar[str] = ""
    Params: ClassVar[type | None] = None

    def __init__(self, params=None):
        self.params = params

    def reset(self) -> None:
        """Forget per-shard state."""

    def check(self, dense: DenseText, sample: Sample) -> str | None:
        raise NotImplementedError


@FILTERS.register("length")
class LengthFilter(Filter):
    """Length bounds in words (and optionally completion tokens): drops 'too_short' / 'too_long';
    with drop_truncated, captions cut by max_tokens ('truncated' score from the server) too."""

    @dataclass
    class Params:
        min_words: int = 8
        max_words: int = 400
        max_tokens: int = 0  # 0 = no token bound
        drop_truncated: bool = False

    def check(self, dense, sample):
        n = len(words(dense.text))
        dense.scores["words"] = float(n)
        p = self.params
        if n < p.min_words:
            return "too_short"
        if n > p.max_words:
            return "too_long"
        if p.max_tokens and dense.scores.get("completion_tokens", 0) > p.max_tokens:
            return "too_long"
        if p.drop_truncated and dense.scores.get("truncated"):
            return "truncated"
        return None


@FILTERS.register("repetition")
class RepetitionFilter(Filter):
    """Degenerate repetition: share of word n-grams that repeat an earlier one ('repetition' when
    above max_dup_ngram_ratio), or one word run repeated more than max_word_run times in a row."""

    @dataclass
    class Params:
        n: int = 4
        max_dup_ngram_ratio: float = 0.4
        max_word_run: int = 3

    def check(self, dense, sample):
        w = words(dense.text)
        n = self.params.n
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        ratio = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
        run = best = 1
        for a, b in zip(w, w[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        dense.scores["dup_ngram_ratio"] = round(ratio, 4)
        if ratio > self.params.max_dup_ngram_ratio or best > self.params.max_word_run:
            return "repetition"
        return None


DEFAULT_REFUSALS = [
    r"\bi'?m sorry\b",
    r"\bi am sorry\b",
    r"\bas an ai\b",
    r"\bas a language model\b",
    r"\bi (?:cannot|can't|can not|am unable to|'m unable to)\b",
    r"\bunable to (?:see|view|describe|provide|process)\b",
    r"\bno image (?:was|is|has been) (?:provided|attached|uploaded)\b",
    r"\bi don'?t have the ability\b",
    r"\bplease (?:provide|upload) (?:an|the) image\b",
]


@FILTERS.register("refusal")
class RefusalFilter(Filter):
    """Refusals and boilerplate ("I'm sorry", "As an AI", "I cannot see the image", "please upload an
    image"): a case-insensitive regex list, extensible through 'extra_patterns'. Reason 'refusal'."""

    @dataclass
    class Params:
        patterns: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
        extra_patterns: list[str] = field(default_factory=list)

    def __init__(self, params):
        super().__init__(params)
        self.regex = re.compile("|".join(f"(?:{p})" for p in params.patterns + params.extra_patterns), re.I)

    def check(self, dense, sample):
        hit = self.regex.search(dense.text.replace("’", "'"))
        dense.scores["refusal"] = 1.0 if hit else 0.0
        return "refusal" if hit else None


@FILTERS.register("garbage")
class GarbageFilter(Filter):
    """Non-text / wrong-language garbage: share of characters that are letters, spaces or common
    punctuation (min_text_char_ratio), share of letters in the expected script (Latin by default;
    min_script_ratio, 0 disables) and share of tokens that look like words. Reason 'garbage'."""

    @dataclass
    class Params:
        min_text_char_ratio: float = 0.9
        min_script_ratio: float = 0.9
        script: str = "LATIN"
        min_word_token_ratio: float = 0.7

    def check(self, dense, sample):
        t = dense.text
        if not t:
            dense.scores["text_char_ratio"] = 0.0
            return "garbage"
        ok = sum(1 for c in t if c.isalpha() or c.isspace() or c in ".,;:!?'\"()-’")
        letters = [c for c in t if c.isalpha()]
        script = sum(1 for c in letters if unicodedata.name(c, "").startswith(self.params.script)) / max(
            1, len(letters)
        )
        toks = t.split()
        wordlike = sum(1 for x in toks if re.fullmatch(r"[\"'(]*[^\W\d_]+(?:[-'’][^\W\d_]+)*[.,;:!?\"')]*", x)) / max(
            1, len(toks)
        )
        dense.scores.update(
            text_char_ratio=round(ok / len(t), 4), script_ratio=round(script, 4), word_token_ratio=round(wordlike, 4)
        )
        p = self.params
        if ok / len(t) < p.min_text_char_ratio or wordlike < p.min_word_token_ratio:
            return "garbage"
        if p.min_script_ratio and script < p.min_script_ratio:
            return "garbage"
        return None


def minhash_seeds(num_perm: int) -> np.ndarray:
    """The per-permutation seeds of :func:`minhash_signature`, shape (num_perm, 1)."""
    seeds = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in range(num_perm)
    ]
    return np.array(seeds, dtype=np.uint64)[:, None]


def minhash_signature(text: str, shingle: int, seeds: np.ndarray) -> np.ndarray:
    """MinHash of the text's word ``shingle``-grams: one 64-bit hash per shingle, then one cheap mix
    per permutation (vectorised), h_i(x) = splitmix64(x ^ seed_i); the minimum over shingles."""
    w = words(text)
    sh = {" ".join(w[i : i + shingle]) for i in range(max(1, len(w) - shingle + 1))} or {""}
    x = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in sh], dtype=np.uint64
    )[None, :]
    z = x ^ seeds
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z.min(axis=1)


@FILTERS.register("near-duplicate")
class NearDuplicateFilter(Filter):
    """Near-duplicate captions across images within a shard: MinHash over word shingles with LSH
    banding; a caption whose estimated Jaccard similarity to an earlier kept one reaches 'threshold'
    is dropped as 'near_duplicate' (generic captions that say nothing image-specific)."""

    @dataclass
    class Params:
        shingle: int = 3
        num_perm: int = 64
        bands: int = 16
        threshold: float = 0.8

    def __init__(self, params):
        super().__init__(params)
        if params.num_perm % params.bands:
            raise ValueError("near-duplicate: num_perm must be a multiple of bands")
        self.seeds = minhash_seeds(params.num_perm)
        self.reset()

    def reset(self):
        self.buckets: dict[tuple, list[int]] = {}
        self.signatures: list[tuple[int, ...]] = []

    def signature(self, text: str) -> tuple[int, ...]:
        return tuple(minhash_signature(text, self.params.shingle, self.seeds).tolist())

    def check(self, dense, sample):
        sig = self.signature(dense.text)
        r = self.params.num_perm // self.params.bands
        bands = [(b, sig[b * r : (b + 1) * r]) for b in range(self.params.bands)]
        best = 0.0
        for band in bands:
            for j in self.buckets.get(band, ()):
                other = self.signatures[j]
                best = max(best, sum(a == b for a, b in zip(sig, other)) / len(sig))
        dense.scores["near_dup_similarity"] = round(best, 4)
        if best >= self.params.threshold:
            return "near_duplicate"
        idx = len(self.signatures)
        self.signatures.append(sig)
        for band in bands:
            self.buckets.setdefault(band, []).append(idx)
        return None


@FILTERS.register("grounding")
class GroundingFilter(Filter):
    """Grounding against the image's sparse (human) captions: the share of the sparse captions'
    content words that the description mentions. Below min_overlap the description is dropped as
    'ungrounded' (it shares next to nothing with what people said). Images without sparse captions pass."""

    @dataclass
    class Params:
        min_overlap: float = 0.1

    def check(self, dense, sample):
        if not sample.sparse:
            return None
        ref = set().union(*(content_words(c) for c in sample.sparse))
        if not ref:
            return None
        overlap = len(ref & content_words(dense.text)) / len(ref)
        dense.scores["grounding"] = round(overlap, 4)
        return "ungrounded" if overlap < self.params.min_overlap else None


DEFAULT_FILTERS = ["length", "repetition", "refusal", "garbage", "near-duplicate", "grounding"]


class FilterChain:
    """The configured filters, in order, with counters of kept / dropped-by-reason."""

    def __init__(self, filters: list[Filter]):
        self.filters = filters
        self.counts: Counter[str] = Counter()

    def reset(self) -> None:
        for f in self.filters:
            f.reset()

    def apply(self, dense: DenseText, sample: Sample) -> str:
        """Set and return dense.verdict ('keep' or the first reason); errors are left alone."""
        if dense.error:
            dense.verdict = "error"
            self.counts["error"] += 1
            return "error"
        verdict = "keep"
        for f in self.filters:
            reason = f.check(dense, sample)
            if reason:
                verdict = reason
                break
        dense.verdict = verdict
        self.counts[verdict] += 1
        return verdict
