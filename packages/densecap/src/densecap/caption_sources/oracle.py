"""synthetic-oracle: the exact dense description of a synthetic-world scene."""

from __future__ import annotations

import json

from d2s.schema import DenseText, Sample

from .base import CAPTION_SOURCES, CaptionSource


@CAPTION_SOURCES.register("synthetic-oracle")
class SyntheticOracleSource(CaptionSource):
    """The exact description of a synthetic-world image: d2s.synthetic.describe(scene) of the scene
    stored in sample.meta['scene']. No model; the quickstart's default. Images without a scene get
    an error record."""

    def __init__(self, params=None, *, label: str = ""):
        super().__init__(params, label=label)
        from d2s import synthetic

        self._describe = synthetic.describe
        self.model = "d2s.synthetic.describe"

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        out: list[DenseText | None] = []
        for s in samples:
            raw = s.meta.get("scene")
            if not raw:
                out.append(self.failed("sample has no meta['scene'] (not a synthetic-world image)"))
                continue
            try:
                out.append(self.dense(self._describe(json.loads(raw))))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                out.append(self.failed(f"bad scene in meta['scene']: {type(exc).__name__}: {exc}"))
        return out
