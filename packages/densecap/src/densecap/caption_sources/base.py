"""The caption-source interface.

A caption source gets a batch of samples and returns, for each, one
:class:`d2s.schema.DenseText` (with provenance: ``source``, ``model``, ``prompt``,
``params``), or ``None`` when it has nothing for that image (an imported corpus that does
not cover it). A failure for one image is a DenseText with ``error`` set and
``verdict="error"``: it is written to the shard, never dropped, and a rerun fills it.

    @CAPTION_SOURCES.register("shouty")          # or an entry point, see docs/caption-sources.md
    class Shouty(CaptionSource):
        @dataclass
        class Params:
            word: str = "IMAGE"

        async def caption(self, samples):
            return [self.dense(f"{self.params.word} {s.id}") for s in samples]

Everything is ``async`` so that network sources keep many requests in flight; a
synchronous source simply does its work inside ``caption``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from d2s.registry import PluginRegistry
from d2s.schema import DenseText, Sample

CAPTION_SOURCES: PluginRegistry[CaptionSource] = PluginRegistry("caption source", "densecap.caption_sources")


class CaptionSourceError(RuntimeError):
    """A caption source that cannot work at all (server unreachable, unknown model...)."""


@dataclass
class SamplingParams:
    """Generation settings shared by the model-backed sources; stored in DenseText.params."""

    temperature: float = 0.2
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int | None = 0

    def as_params(self) -> dict[str, float]:
        d = {"temperature": float(self.temperature), "top_p": float(self.top_p), "max_tokens": float(self.max_tokens)}
        if self.seed is not None:
            d["seed"] = float(self.seed)
        return d


class CaptionSource:
    """Base class: subclasses set ``Params`` (a dataclass) and implement ``caption``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type | None] = None
    #: Params fields that decide how captions are obtained but not what they say (where the
    #: server is, how many requests are in flight, timeouts, retries). They are left out of the
    #: shard fingerprint, so changing them fills failed captions and keeps the rest.
    transport_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any = None, *, label: str = ""):
        self.params = params
        #: recorded as DenseText.source; several instances of one type can coexist with labels
        self.label = label or self.name
        #: set when the source cannot go on (e.g. the server is gone); the run stops after the shard
        self.fatal: str = ""
        self.model = ""
        self.prompt = ""

    async def start(self) -> None:
        """Check that the source can work (connect, load a model); raise CaptionSourceError if not."""

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections / engines."""

    # helpers ------------------------------------------------------------------------
    def sampling_params(self) -> dict[str, float]:
        sp = getattr(self.params, "sampling", None)
        return sp.as_params() if isinstance(sp, SamplingParams) else {}

    def dense(self, text: str, **kw: Any) -> DenseText:
        """A DenseText carrying this source's provenance."""
        kw.setdefault("model", self.model)
        kw.setdefault("prompt", self.prompt)
        kw.setdefault("params", self.sampling_params())
        return DenseText(text=text, source=self.label, **kw)

    def failed(self, error: str, **kw: Any) -> DenseText:
        return self.dense("", error=error, verdict="error", **kw)
