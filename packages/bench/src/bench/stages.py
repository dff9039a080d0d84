"""The ``bench-retrieval`` pipeline stage: a model bundle + a shards split -> results dir."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from d2s.config import to_dict
from d2s.pipeline import Stage, StageContext

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
class BenchRetrievalParams(RetrievalSettings):
    """The stage's params: the retrieval settings bench's API and CLI use (:class:`bench.api.RetrievalSettings`:
    protocols, long_text, chunk_size, ties, engine, faiss_k, batch sizes, device) plus what to read and write."""

    split: str = "test"
    max_captions: int = 5
    name: str = ""
    save_embeddings: bool = True  # embeddings.safetensors beside the results (the report's examples use them)

    def settings(self) -> RetrievalSettings:
        return RetrievalSettings(**{f.name: getattr(self, f.name) for f in fields(RetrievalSettings)})


# settings the params gained by holding a RetrievalSettings: left out of the cache key while at their
# default, so that the results cached before keep their hash
_NEW_SETTINGS = {"engine": "exact", "faiss_k": 100}


class BenchRetrievalStage(Stage):
    """Embed a shards split with a trained bundle and write results.json + results.md."""

    Params = BenchRetrievalParams
    inputs = {"bundle": "model bundle directory (vse.bundle)", "shards": "shards directory with the split"}
    outputs = {"results": "directory with results.json and results.md"}
    version = "2"

    @classmethod
    def cache_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if not (k in _NEW_SETTINGS and v == _NEW_SETTINGS[k])}
        return super().cache_params(params)

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
