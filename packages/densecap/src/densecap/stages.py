"""The ``densecap`` pipeline stage type (entry point group ``d2s.stages``)."""

from __future__ import annotations

import dataclasses

from d2s.pipeline import Stage, StageContext

from .config import PluginConfig, RunConfig, StageConfig, execution_fields
from .run import run
from .worker import strip_transport


class DensecapStage(Stage):
    """Dense captions for a set of images: image source -> caption sources -> filters -> shards.

    ``params`` is a :class:`densecap.config.StageConfig` (the densecap config plus ``rank`` /
    ``world_size``). Every plug-in's params are parsed when the pipeline is validated. The
    input ``shards`` (a shard directory, e.g. the synthetic world) overrides
    ``source.params.path``; without it the configured source is used as is.

    Several machines: give the stage one shared output directory (``outputs.shards`` or a
    shared ``run_dir``) and run the pipeline on each machine with ``<stage>.params.rank=R
    <stage>.params.world_size=N``. Each machine captions its units (round-robin); a machine
    that finds other ranks' units still unfinished stops with an error saying so, and the one
    that completes the set writes the manifest and report and goes on to the next stages (a
    rerun on any machine once all have finished does the same).

    On a Ray cluster instead: ``params.executor: {type: ray, address: auto, replicas: N}`` (one
    pipeline process drives the whole cluster; the executor is left out of the cache key).
    """

    Params = StageConfig
    inputs = {"shards?": "directory of shards (source type 'shards' unless params.source says otherwise)"}
    outputs = {"shards": "shards with dense texts, manifest.json and rejects/", "report": "summary report directory"}
    # 2: the caption sources are hashed under their own name, ``caption_sources`` (were ``captioners``)
    version = "2"
    # How this process takes part, not what the dataset is: several ranks share one output.
    execution_params = execution_fields(StageConfig)

    @classmethod
    def cache_params(cls, params: dict) -> dict:
        """Also without the caption sources' transport params (server address, key source,
        concurrency, timeouts, retries): moving the server keeps the stage and its shards."""
        doc = super().cache_params(params)
        doc["caption_sources"] = strip_transport(doc.get("caption_sources") or [])
        return doc

    def run(self, ctx: StageContext) -> dict:
        p: StageConfig = ctx.params
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(StageConfig)}
        if ctx.inputs.get("shards"):
            src = p.source
            fields["source"] = PluginConfig(src.type, {**src.params, "path": str(ctx.inputs["shards"])}, src.label)
        cfg = RunConfig(**fields, out=str(ctx.outputs["shards"]), report=str(ctx.outputs["report"]))
        summary = run(cfg)
        if not summary.get("complete"):
            if p.world_size > 1:
                raise RuntimeError(
                    f"densecap stage {ctx.name}: rank {p.rank}/{p.world_size} finished its {summary.get('units_total', 0)} "
                    f"unit(s), but other ranks' units in {ctx.outputs['shards']} are not complete yet. Once every rank "
                    "has finished, run the pipeline again (any rank) to write the manifest and report and go on."
                )
            raise RuntimeError(f"densecap stage {ctx.name}: not all shards complete: {summary}")
        return {
            k: summary[k]
            for k in ("units_total", "captions_requested", "captions_kept", "caption_errors")
            if k in summary
        }
