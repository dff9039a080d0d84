"""densecap's grounding step: score every sentence of the dense texts against the image.

Configured as ``grounding:`` of a densecap job (:class:`GroundingConfig`). It runs after the
filters, on the captions they kept (and on captions an earlier grounding run dropped as
``unsupported``, which a new threshold may keep). The scorer is found by name in
``d2s.grounding.SCORERS``: densecap knows no model; ``vse-bundle`` and ``hf-dual-encoder``
come from the vse package's entry points.

Scores are stored once: a dense text that already carries sentences scored by the same
scorer (``DenseText.scorer``: the scorer's identity and the calibration bank's size) is not
scored again, so a new threshold or action over an already scored corpus (``densecap ground``
with the scored shards as input) scores nothing: the scorer is built only to read its identity,
and the calibration bank is never embedded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from d2s.grounding import (
    SCORERS,
    GroundingAction,
    ReferenceBank,
    ScorerError,
    SentenceScorer,
    apply_action,
    score_batch,
)
from d2s.schema import DenseText, Sample

log = logging.getLogger(__name__)


@dataclass
class ScorerConfig:
    """A sentence scorer by registered name, with its own params (validated by its Params)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroundingConfig:
    """``grounding:`` of a densecap job; see docs/grounding.md.

    ``action``: ``score`` stores the scores; ``drop`` also drops a caption whose mean sentence
    score is below ``min_caption_score``; ``repair`` removes the sentences scoring below
    ``threshold`` (kept in the record with their scores). ``reference_images``: the first N
    images of the job's image source, against which every score is calibrated
    (``calibration``: see ``d2s.grounding.calibrate``).
    ``sources``: the caption-source labels whose texts are scored (empty: all).
    """

    scorer: ScorerConfig
    action: Literal["score", "drop", "repair"] = "score"
    threshold: float = 1.0
    min_caption_score: float = 1.0
    reference_images: int = 256
    calibration: Literal["sentence", "pooled", "none"] = "sentence"
    batch_size: int = 64
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.reference_images < 2:
            raise ValueError("reference_images must be >= 2")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def validate(self) -> None:
        """Parse the scorer's params with its registry (errors name ``grounding.scorer``); when a
        configuration is read, so a pipeline fails before any stage runs."""
        from d2s.config import ConfigError

        try:
            SCORERS.get(self.scorer.type)
        except ConfigError as exc:
            raise ConfigError(f"grounding.scorer.type: {exc}") from None
        SCORERS.parse_params(self.scorer.type, self.scorer.params, "grounding.scorer.params")

    def check(self) -> None:
        """The scorer's cheap checks (a model path that must exist), when the job starts: in a
        pipeline the path may be an earlier stage's output, which exists only by then."""
        from d2s.config import ConfigError

        params = SCORERS.parse_params(self.scorer.type, self.scorer.params, "grounding.scorer.params")
        try:
            SCORERS.get(self.scorer.type).check(params)
        except ScorerError as exc:
            raise ConfigError(f"grounding.scorer.params.{exc}") from None

    def action_config(self) -> GroundingAction:
        return GroundingAction(self.action, self.threshold, self.min_caption_score)


class Grounder:
    """Scores, drops or repairs the dense texts of sample batches, counting what it did.

    The scorer and its reference bank are built on first need (``reference`` yields the
    job's samples in order), so a run whose texts are all scored already embeds nothing."""

    def __init__(self, cfg: GroundingConfig, reference: Callable[[], Iterable[Sample]]):
        self.cfg = cfg
        self.action = cfg.action_config()
        self._reference = reference
        self._scorer: SentenceScorer | None = None
        self._bank: ReferenceBank | None = None
        self._id: str | None = None
        #: whether some text was scored (not only re-thresholded from stored scores)
        self.scored = False

    @property
    def scorer(self) -> SentenceScorer:
        if self._scorer is None:
            params = dict(self.cfg.scorer.params)
            P = getattr(SCORERS.get(self.cfg.scorer.type), "Params", None)
            if P is not None and "progress" in {f.name for f in dataclasses.fields(P)}:
                params.setdefault("progress", False)  # densecap's own bar counts the images
            self._scorer = SCORERS.create(self.cfg.scorer.type, params, "grounding.scorer.params")
        return self._scorer

    @property
    def scorer_id(self) -> str:
        """Recorded as DenseText.scorer: the scorer's identity, the bank size and the calibration."""
        if self._id is None:
            self._id = f"{self.scorer.identity} ref={self.cfg.reference_images} calibration={self.cfg.calibration}"
        return self._id

    def bank(self) -> ReferenceBank:
        if self._bank is None:
            self._bank = ReferenceBank.build(self.scorer, self._reference(), self.cfg.reference_images)
            log.info("grounding: calibration bank of %d reference images", len(self._bank.keys))
        return self._bank

    def wants(self, d: DenseText) -> bool:
        """Kept texts (and earlier 'unsupported' ones) of the configured sources; a kept text
        that is empty is wanted too, so that scoring fails naming it."""
        if d.error:
            return False
        if self.cfg.sources and d.source not in self.cfg.sources:
            return False
        return d.verdict in ("keep", "unsupported")

    def ground(self, batch: list[Sample], counts: Counter, rejects: list[dict]) -> None:
        """Score (or reuse the stored scores of) every wanted text of ``batch``, then act."""
        items = [(s, d) for s in batch for d in s.dense if self.wants(d)]
        if not items:
            return
        fresh = [(s, d) for s, d in items if not (d.sentences and d.scorer == self.scorer_id)]
        scored: dict[int, list] = {}
        for i in range(0, len(fresh), self.cfg.batch_size):
            chunk = fresh[i : i + self.cfg.batch_size]
            for (_, d), sents in zip(chunk, score_batch(self.scorer, self.bank(), chunk, self.cfg.calibration)):
                scored[id(d)] = sents
        self.scored = self.scored or bool(fresh)
        counts["captions_scored"] += len(fresh)
        counts["captions_scores_reused"] += len(items) - len(fresh)
        for s, d in items:
            sents = scored.get(id(d), d.sentences)
            counts["sentences_scored"] += len(sents) if id(d) in scored else 0
            was_kept = d.verdict == "keep"
            what = apply_action(d, sents, self.scorer_id, self.action)
            self._count(s, d, what, was_kept, counts, rejects)

    @staticmethod
    def _count(s: Sample, d: DenseText, what: str, was_kept: bool, counts: Counter, rejects: list[dict]) -> None:
        """Count what grounding did and record repairs and drops as rejects (the shard's kept /
        dropped totals are tallied from the written samples by the caller)."""
        if what == "repaired":
            removed = [x for x in d.sentences if x.removed]
            counts["captions_repaired"] += 1
            counts["sentences_removed"] += len(removed)
            rejects.append(
                {
                    "kind": "repair",
                    "key": s.key,
                    "id": s.id,
                    "source": d.source,
                    "removed": [{"text": x.text, "score": x.score} for x in removed],
                }
            )
        now_kept = d.verdict == "keep"
        if was_kept and not now_kept:  # counted as dropped_unsupported by the caller's tally
            rejects.append(
                {
                    "kind": "caption",
                    "key": s.key,
                    "id": s.id,
                    "source": d.source,
                    "reason": "unsupported",
                    "text": d.text,
                    "scores": d.scores,
                }
            )
        elif now_kept and not was_kept:  # an earlier run's 'unsupported' that the new setting keeps
            counts["restored_unsupported"] += 1
