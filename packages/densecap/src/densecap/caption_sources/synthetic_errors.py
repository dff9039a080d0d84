"""synthetic-errors: the exact description of a synthetic-world scene with planted false sentences,
each sentence's truth recorded (d2s.synthetic.plant_errors; docs/synthetic-world.md, "Planted errors")."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from d2s.schema import DenseText, Sample, SentenceTruth

from .base import CAPTION_SOURCES, CaptionSource


def _equal_mix() -> dict[str, float]:
    from d2s.synthetic import ERROR_KINDS

    return dict.fromkeys(ERROR_KINDS, 1.0)


def sample_seed(seed: int, key: str) -> int:
    """The seed of one sample's errors: a function of (seed, sample key) only, so a resumed,
    re-split or reordered run plants the same errors."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8, person=b"d2s-errors").digest()
    return int.from_bytes(digest, "little")


@CAPTION_SOURCES.register("synthetic-errors")
class SyntheticErrorsSource(CaptionSource):
    """The exact description of a synthetic-world image with a share `rate` of false sentences
    (kinds weighted by `mix`), each sentence's truth in DenseText.truth (for evaluation only; no
    filter or scorer reads it). Images without a scene get an error record."""

    @dataclass
    class Params:
        rate: float = 0.3  # expected share of the caption's sentences that are false
        # relative weight of each error kind (kinds left out weigh 0); default: all 8 equal
        mix: dict[str, float] = field(default_factory=_equal_mix)
        seed: int = 0  # with the sample key, the only source of randomness

        def __post_init__(self) -> None:
            from d2s.synthetic import check_error_params

            check_error_params(self.rate, self.mix)  # ValueError naming rate or mix.<kind>

    def __init__(self, params: SyntheticErrorsSource.Params | None = None, *, label: str = ""):
        super().__init__(params if params is not None else self.Params(), label=label)
        self.model = "d2s.synthetic.plant_errors"

    def provenance(self) -> dict[str, float]:
        from d2s.synthetic import ERROR_KINDS

        p = self.params
        weights = {f"mix.{k}": float(p.mix.get(k, 0.0)) for k in ERROR_KINDS}
        return {"rate": float(p.rate), "seed": float(p.seed), **weights}

    def caption_one(self, s: Sample) -> DenseText:
        import numpy as np

        from d2s.synthetic import WorldConfig, plant_errors

        raw = s.meta.get("scene")
        if not raw:
            return self.failed("sample has no meta['scene'] (not a synthetic-world image)")
        try:
            scene = json.loads(raw)
            world = WorldConfig(**json.loads(s.meta["world"])) if s.meta.get("world") else None
            rng = np.random.default_rng(sample_seed(self.params.seed, s.key))
            planted = plant_errors(scene, rng, self.params.rate, self.params.mix, world=world)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return self.failed(f"bad scene or world in meta: {type(exc).__name__}: {exc}")
        return self.dense(
            " ".join(text for text, _ in planted),
            params=self.provenance(),
            truth=[SentenceTruth(text, label) for text, label in planted],
        )

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        return [self.caption_one(s) for s in samples]
