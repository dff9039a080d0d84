"""The ``densecap`` pipeline stage type (entry point group ``d2s.stages``)."""

from __future__ import annotations

from d2s.pipeline import Stage, StageContext

from .config import DensecapConfig, PluginConfig, RunConfig
from .run import run


class DensecapStage(Stage):
    """Dense captions for a set of images: image source -> caption sources -> filters -> shards.

    ``params`` is a :class:`densecap.config.DensecapConfig`. The input ``shards`` (a shard
    directory, e.g. the synthetic world) overrides ``source.params.path``; without it the
    configured source is used as is.
    """

    Params = DensecapConfig
    inputs = {"shards?": "directory of shards (source type 'shards' unless params.source says otherwise)"}
    outputs = {"shards": "shards with dense texts, manifest.json and rejects/", "report": "summary report directory"}
    version = "1"

    def run(self, ctx: StageContext) -> dict:
        p: DensecapConfig = ctx.params
        source = p.source
        if ctx.inputs.get("shards"):
            source = PluginConfig(source.type, {**source.params, "path": str(ctx.inputs["shards"])}, source.label)
        cfg = RunConfig(**{**{k: getattr(p, k) for k in DensecapConfig.__dataclass_fields__}, "source": source,
                           "out": str(ctx.outputs["shards"]), "report": str(ctx.outputs["report"])})
        summary = run(cfg)
        if not summary.get("complete"):
            raise RuntimeError(f"densecap stage {ctx.name}: not all shards complete: {summary}")
        return {k: summary[k] for k in ("units_total", "captions_requested", "captions_kept", "caption_errors") if k in summary}
