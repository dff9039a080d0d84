"""The ``bench-retrieval`` pipeline stage: a model bundle + a shards split -> results dir."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from d2s.config import to_dict
from d2s.pipeline import Stage, StageContext
from d2s.retrieval import DEFAULT_CHUNK_SIZE

from .api import (
    BenchResults,
    RetrievalSettings,
    embed_eval_set,
    evaluate_embeddings,
    load_encoder,
    save_embeddings,
    write_results,
)
from .data import load_shards


@dataclass
class BenchRetrievalParams:
    split: str = "test"
    protocols: list[str] = field(default_factory=lambda: ["custom"])  # sparse-caption protocols
    long_text: bool = True  # image <-> kept dense text, where samples have one
    max_captions: int = 5
    ties: Literal["stable", "optimistic", "pessimistic"] = "stable"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    image_batch_size: int = 64
    text_batch_size: int = 256
    device: str | None = None
    name: str = ""
    save_embeddings: bool = True  # embeddings.safetensors beside the results (the report's examples use them)

    def __post_init__(self) -> None:
        self.settings()  # validates protocols and sizes

    def settings(self) -> RetrievalSettings:
        return RetrievalSettings(
            protocols=list(self.protocols),
            long_text=self.long_text,
            chunk_size=self.chunk_size,
            ties=self.ties,
            image_batch_size=self.image_batch_size,
            text_batch_size=self.text_batch_size,
            device=self.device,
        )


class BenchRetrievalStage(Stage):
    """Embed a shards split with a trained bundle and write results.json + results.md."""

    Params = BenchRetrievalParams
    inputs = {"bundle": "model bundle directory (vse.bundle)", "shards": "shards directory with the split"}
    outputs = {"results": "directory with results.json and results.md"}
    version = "2"

    def run(self, ctx: StageContext) -> dict:
        p: BenchRetrievalParams = ctx.params
        s = p.settings()
        t0 = time.perf_counter()
        data = load_shards(ctx.inputs["shards"], p.split, p.max_captions)
        emb = embed_eval_set(load_encoder(ctx.inputs["bundle"], p.device), data, s)
        benchmarks = evaluate_embeddings(emb, s)
        source = {"bundle": str(ctx.inputs["bundle"]), "shards": str(ctx.inputs["shards"]), "split": p.split}
        results = BenchResults(p.name or ctx.name, benchmarks, source, to_dict(s), time.perf_counter() - t0)
        out = Path(ctx.outputs["results"])
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_results(results, tmp)
        if p.save_embeddings:
            save_embeddings(emb, tmp / "embeddings.safetensors")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # the directory appears only when complete
        ctx.log.info("results in %s", out)
        return {k: round(v.metrics.rsum, 2) for k, v in benchmarks.items()}
