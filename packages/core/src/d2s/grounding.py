"""Sentence grounding: score every sentence of a dense text against its image.

A *scorer* embeds images and sentences into one space (:class:`SentenceScorer`); scorers
are found by name in :data:`SCORERS` (entry-point group ``d2s.scorers``). This layer knows
no model: the model-backed scorers live where models are loaded (``vse.scoring``: a bundle
of this project, any Hugging Face dual encoder), and densecap finds them through the
registry's entry points.

The score of a sentence is *calibrated* against reference images::

    similarity = cos(sentence, its image)
    score      = (similarity - mean_k cos(sentence, ref_k)) / std_k cos(sentence, ref_k)

i.e. how many standard deviations better the sentence fits its own image than it fits a
fixed bank of other images of the corpus (its own image left out of the bank). This takes
out what the raw cosine carries besides grounding: a sentence's general closeness to every
image (long or generic sentences sit closer to all images), so one threshold serves a whole
corpus, and a sentence true of any image ("The shapes have flat colours.") scores near 0,
as an invented one does. ``docs/grounding.md`` measures it.

What is stored (``d2s.schema``): ``DenseText.sentences`` (text, score, similarity, removed),
``DenseText.scorer``, ``scores["grounding_score"]`` (mean sentence score) and
``scores["unsupported_sentences"]``. A new threshold or action needs no new scoring:
:func:`apply_action` works from the stored scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .registry import PluginRegistry
from .schema import DenseText, Sample, Sentence

if TYPE_CHECKING:  # torch is imported where a score is computed: a captioning process never needs it
    import torch

# ---- sentences ------------------------------------------------------------------------

# a list marker left at the end of a segment ("... objects: 1. ") belongs to the next one
_TRAILING_MARKER = re.compile(r"(?:^|\s)(\(?\d{1,2}[.)])\s*$")


def split_sentences(text: str) -> list[str]:
    """The sentences (claims) of a description, stripped, in order.

    sentencex (a maintained rule-based segmenter) does the splitting: it keeps abbreviations
    (Dr., e.g., U.S.), decimals (3.5) and quotes inside their sentence, and splits lines and
    bullets. Two fixes on top, for the lists VLMs write: a numbered-list marker that sentencex
    leaves at the end of a segment ("objects: 1.") starts the next segment instead, and a
    segment that starts with a lower-case letter or a digit continues the previous one (a
    split after an abbreviation it does not know: "approx. | 3 cm").
    """
    import sentencex

    out: list[str] = []
    carry = ""
    for seg in sentencex.segment("en", text):
        seg = carry + seg.strip()
        carry = ""
        m = _TRAILING_MARKER.search(seg)
        if m:
            carry = m.group(1) + " "
            seg = seg[: m.start()].strip()
        if not seg:
            continue
        if out and (seg[0].islower() or (seg[0].isdigit() and not re.match(r"\d{1,2}[.)]\s", seg))):
            out[-1] = f"{out[-1]} {seg}"
        else:
            out.append(seg)
    if carry.strip():
        out.append(carry.strip())
    return out


# ---- scorers --------------------------------------------------------------------------


class ScorerError(ValueError):
    """A scorer that cannot be built or cannot score its input (the message names what)."""


class SentenceScorer:
    """Base class: embed images and texts into one space.

    Subclasses set ``Params`` (a dataclass; ``batch_size`` and ``device`` by convention) and
    implement ``embed_images`` / ``embed_texts``, each returning L2-normalised float32 CPU
    tensors with one row per input. ``identity`` names the model and everything that decides
    its scores; it is stored with the scores (``DenseText.scorer``) and decides whether
    stored scores can be reused.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type | None] = None

    def __init__(self, params: Any = None):
        self.params = params

    @property
    def identity(self) -> str:
        from .config import to_dict

        doc = to_dict(self.params) if self.params is not None else {}
        for k in ("batch_size", "device", "progress"):  # how, not what
            doc.pop(k, None)
        return f"{self.name}:{json.dumps(doc, sort_keys=True, default=str)}"

    @classmethod
    def check(cls, params: Any) -> None:
        """Cheap checks of parsed ``params`` that load nothing (a path that must exist), run when
        a configuration is read; raise :class:`ScorerError` naming the field."""

    def embed_images(self, images: Sequence[bytes], keys: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


SCORERS: PluginRegistry[SentenceScorer] = PluginRegistry("sentence scorer", "d2s.scorers")


# ---- calibration ----------------------------------------------------------------------


@dataclass
class ReferenceBank:
    """Embeddings of reference images (rows L2-normalised) and their keys."""

    embeddings: torch.Tensor
    keys: list[str]

    @classmethod
    def build(cls, scorer: SentenceScorer, samples: Iterable[Sample], size: int) -> ReferenceBank:
        """The first ``size`` images of ``samples`` (deterministic for a given corpus order)."""
        images, keys = [], []
        for s in samples:
            if len(images) >= size:
                break
            images.append(s.image)
            keys.append(s.key)
        if len(images) < 2:
            raise ScorerError(f"calibration needs at least 2 reference images, got {len(images)}")
        return cls(scorer.embed_images(images, keys), keys)


CALIBRATIONS = ("sentence", "pooled", "none")


def calibrate(
    text_emb: torch.Tensor,
    own_image: torch.Tensor,
    bank: ReferenceBank,
    own_keys: Sequence[str],
    mode: str = "sentence",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, similarity) per row: ``text_emb[i]`` against ``own_image[i]``, calibrated against
    the bank with the row's own image (``own_keys[i]``) left out.

    ``sentence``: (similarity - the sentence's mean over the bank) / its standard deviation over
    the bank. ``pooled``: the same difference over one standard deviation pooled over every
    sentence of the call (the sentence's own spread no longer scales its score). ``none``: the
    raw cosine."""
    if mode not in CALIBRATIONS:
        raise ValueError(f"calibration: {mode!r} is not one of {list(CALIBRATIONS)}")
    import torch

    sim = (text_emb * own_image).sum(1)
    if mode == "none":
        return sim.clone(), sim
    ref = text_emb @ bank.embeddings.T  # (M, K)
    index = {k: j for j, k in enumerate(bank.keys)}
    col = torch.tensor([index.get(k, -1) for k in own_keys], dtype=torch.long)
    keep = torch.ones_like(ref, dtype=torch.bool)
    rows = (col >= 0).nonzero().squeeze(1)
    keep[rows, col[rows]] = False
    n = keep.sum(1).clamp(min=2).to(ref.dtype)
    mean = (ref * keep).sum(1) / n
    sq = (((ref - mean[:, None]) * keep) ** 2).sum(1)
    if mode == "pooled":
        return (sim - mean) / ((sq.sum() / (n - 1).sum()).sqrt() + eps), sim
    return (sim - mean) / ((sq / (n - 1)).sqrt() + eps), sim


# ---- scoring samples -------------------------------------------------------------------


def to_score(dense: DenseText) -> str:
    """The text a scorer sees: the caption as captioned (before any repair)."""
    return dense.original_text or dense.text


def score_batch(
    scorer: SentenceScorer, bank: ReferenceBank, items: list[tuple[Sample, DenseText]], calibration: str = "sentence"
) -> list[list[Sentence]]:
    """Score the sentences of each (sample, dense text) pair: one image forward per distinct
    sample and one text forward for all sentences of the batch."""
    owners: dict[str, int] = {}
    images, keys = [], []
    for s, _ in items:
        if s.key not in owners:
            owners[s.key] = len(images)
            images.append(s.image)
            keys.append(s.key)
    sentences = [split_sentences(to_score(d)) for _, d in items]
    for (s, d), ts in zip(items, sentences):
        if not ts:
            raise ScorerError(f"key {s.key!r}: dense text from {d.source!r} is empty; there is nothing to score")
    flat = [t for ts in sentences for t in ts]
    import torch

    img = scorer.embed_images(images, keys)
    txt = scorer.embed_texts(flat)
    rows = torch.tensor([owners[s.key] for (s, _), ts in zip(items, sentences) for _ in ts], dtype=torch.long)
    row_keys = [s.key for (s, _), ts in zip(items, sentences) for _ in ts]
    score, sim = calibrate(txt, img[rows], bank, row_keys, calibration)
    score, sim = score.tolist(), sim.tolist()
    out, i = [], 0
    for ts in sentences:
        out.append([Sentence(t, round(score[i + j], 4), round(sim[i + j], 4)) for j, t in enumerate(ts)])
        i += len(ts)
    return out


# ---- actions --------------------------------------------------------------------------


@dataclass
class GroundingAction:
    """What to do with the scores.

    ``score``: store them only. ``drop``: also drop a caption whose mean sentence score is
    below ``min_caption_score`` (verdict ``unsupported``). ``repair``: also remove the
    sentences scoring below ``threshold`` from the text (kept in ``sentences`` with
    ``removed`` set, the text as captioned in ``original_text``); a caption left with no
    supported sentence is dropped as ``unsupported``.
    """

    action: Literal["score", "drop", "repair"] = "score"
    threshold: float = 1.0
    min_caption_score: float = 1.0


def apply_action(dense: DenseText, sentences: list[Sentence], scorer_id: str, cfg: GroundingAction) -> str:
    """Store ``sentences`` on ``dense`` and carry out ``cfg``; returns what happened:
    ``scored``, ``repaired`` or ``dropped`` (a caption another filter dropped stays dropped
    and is only scored). Idempotent: a repaired caption is restored before it is redone."""
    if dense.original_text:
        dense.text, dense.original_text = dense.original_text, ""
    if dense.verdict == "unsupported":
        dense.verdict = "keep"
    sentences = [Sentence(s.text, s.score, s.similarity) for s in sentences]
    dense.sentences, dense.scorer = sentences, scorer_id
    low = [s for s in sentences if s.score < cfg.threshold]
    mean = sum(s.score for s in sentences) / len(sentences) if sentences else 0.0
    dense.scores["grounding_score"] = round(mean, 4)
    dense.scores["unsupported_sentences"] = float(len(low))
    if dense.verdict != "keep" or not sentences or cfg.action == "score":
        return "scored"
    if cfg.action == "drop":
        if mean < cfg.min_caption_score:
            dense.verdict = "unsupported"
            return "dropped"
        return "scored"
    if len(low) == len(sentences):
        dense.verdict = "unsupported"
        return "dropped"
    if not low:
        return "scored"
    for s in low:
        s.removed = True
    dense.original_text = dense.text
    dense.text = " ".join(s.text for s in sentences if not s.removed)
    return "repaired"


def clear_grounding(dense: DenseText) -> None:
    """Undo grounding: the text as captioned, no sentence scores, no grounding verdict."""
    if dense.original_text:
        dense.text, dense.original_text = dense.original_text, ""
    if dense.verdict == "unsupported":
        dense.verdict = "keep"
    dense.sentences, dense.scorer = [], ""
    for k in ("grounding_score", "unsupported_sentences"):
        dense.scores.pop(k, None)
