"""densecap's pipeline stage types (entry point group ``d2s.stages``): ``densecap`` (caption),
``densecap-dedup``, ``densecap-contamination`` and ``densecap-card`` (corpus integrity)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from d2s.integrity import CONTAMINATION_FILE, DEDUP_FILE, integrity_dir
from d2s.pipeline import Stage, StageContext

from .card import PLOTS_DIR, CardConfig, write_card
from .config import PluginConfig, RunConfig, StageConfig, execution_fields
from .dedup import DedupConfig, DedupParams, dedup
from .executors.base import ExecutorConfig
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


@dataclasses.dataclass
class DedupStageParams(DedupParams):
    """:class:`densecap.dedup.DedupParams` plus who computes the signatures (not in the cache key)."""

    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    num_workers: int = 1
    progress: bool = True


class DedupStage(Stage):
    """Corpus-wide duplicates of the ``shards`` input (``densecap dedup``): writes
    ``<shards>/integrity/dedup.json`` beside the shards (which are not rewritten) and a copy in the
    ``index`` output. Resumable: per-shard signature files survive an interruption."""

    Params = DedupStageParams
    inputs = {"shards": "the corpus (a densecap output directory)"}
    outputs = {"index": "a copy of the dedup index (the one readers use is <shards>/integrity/dedup.json)"}
    version = "1"
    execution_params = ("executor", "num_workers", "progress")

    def run(self, ctx: StageContext) -> dict:
        p: DedupStageParams = ctx.params
        params = DedupParams(**{f.name: getattr(p, f.name) for f in dataclasses.fields(DedupParams)})
        shards = str(ctx.inputs["shards"])
        cfg = DedupConfig(
            inputs=[shards], params=params, executor=p.executor, num_workers=p.num_workers, progress=p.progress
        )
        summary = dedup(cfg)
        _copy_index(shards, DEDUP_FILE, ctx.outputs["index"])
        return {k: summary[k] for k in ("images", "image_duplicates", "texts", "text_duplicates")}


@dataclasses.dataclass
class ContaminationStageParams:
    against: list[str] = dataclasses.field(default_factory=list)
    distance: int = 4
    crop_distance: int = 8
    crop_dhash_distance: int = 12
    crops: bool = True
    bundle: str = ""
    hf_encoder: str = ""
    similarity: float = 0.95
    max_pairs_shown: int = 500
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    num_workers: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.against:
            raise ValueError("against: give at least one evaluation set (shards:DIR[:SPLIT], karpathy:..., folder:DIR)")


class ContaminationStage(Stage):
    """Training images of ``shards`` found in evaluation sets (``densecap contamination``): writes
    ``<shards>/integrity/contamination.json`` and ``contamination.html``, and a copy in ``index``."""

    Params = ContaminationStageParams
    inputs = {"shards": "the training corpus"}
    outputs = {"index": "a copy of the contamination index and its HTML page"}
    version = "1"
    execution_params = ("progress", "executor", "num_workers")

    def run(self, ctx: StageContext) -> dict:
        from .contamination import HTML_FILE, ContaminationConfig, contamination

        p: ContaminationStageParams = ctx.params
        shards = str(ctx.inputs["shards"])
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        summary = contamination(ContaminationConfig(inputs=[shards], **fields))
        _copy_index(shards, CONTAMINATION_FILE, ctx.outputs["index"])
        _copy_index(shards, HTML_FILE, ctx.outputs["index"])
        return {k: summary[k] for k in ("images", "matches", "flagged_images")}


class CardStage(Stage):
    """The data card of the ``shards`` input (``densecap card``): ``README.md`` (a Hugging Face
    dataset card) and ``card.json`` written beside the shards, and copied to ``card``. Give it the
    dedup / contamination stages' outputs as inputs so it runs after them (and again when they change)."""

    Params = CardConfig
    inputs = {
        "shards": "the corpus",
        "dedup?": "the densecap-dedup stage's index (orders the card after it)",
        "contamination?": "the densecap-contamination stage's index",
    }
    outputs = {"card": "a copy of README.md, card.json and the plots"}
    version = "1"

    def run(self, ctx: StageContext) -> dict:
        import shutil

        shards = Path(ctx.inputs["shards"])
        summary = write_card(shards, ctx.params)
        out = Path(ctx.outputs["card"])
        out.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "card.json"):
            shutil.copyfile(shards / name, out / name)
        if (shards / PLOTS_DIR).is_dir():
            shutil.copytree(shards / PLOTS_DIR, out / PLOTS_DIR, dirs_exist_ok=True)
        return {"images": summary["images"], "fingerprint": summary["fingerprint"]}


def _copy_index(shards: str, name: str, out: Path) -> None:
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(integrity_dir(shards) / name, out / name)
