"""The ``bench-retrieval`` pipeline stage: a model bundle + a shards split -> results dir."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

from d2s.config import to_dict
from d2s.pipeline import Stage, StageContext

from .api import (
    BenchResults,
    RetrievalSettings,
    embed_eval_set,
    evaluate_embeddings,
    load_encoder,
    model_info,
    save_embeddings,
    write_results,
)
from .data import DatasetError, load_shards
from .datasets import BENCHMARKS, load_benchmark

# stage inputs -> the loader's root names of a published benchmark
_ROOT_INPUTS = {"data": "root", "docci": "docci_root", "dci": "dci_root"}


@dataclass
class BenchRetrievalParams(RetrievalSettings):
    """The stage's params: the retrieval settings bench's API and CLI use (:class:`bench.api.RetrievalSettings`:
    protocols, long_text, chunk_size, ties, engine, faiss_k, batch sizes, device, bootstrap intervals) plus
    what to read and write. ``benchmark``: a published long-caption set (``bench.datasets.BENCHMARKS``)
    read from the ``data`` input (IIW also ``docci`` and ``dci``) under its own protocol, instead of shards."""

    split: str = "test"
    max_captions: int = 5
    name: str = ""
    save_embeddings: bool = True  # embeddings.safetensors beside the results (the report's examples use them)
    benchmark: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.benchmark:
            proto = BENCHMARKS.get(self.benchmark).protocol
            if self.protocols not in (["custom"], [proto]):
                raise DatasetError(
                    f"protocols: benchmark {self.benchmark!r} is evaluated under its own protocol {proto!r}; "
                    f"leave protocols out (got {self.protocols})"
                )

    def settings(self) -> RetrievalSettings:
        s = RetrievalSettings(**{f.name: getattr(self, f.name) for f in fields(RetrievalSettings)})
        if self.benchmark:
            s.protocols, s.long_text = [BENCHMARKS.get(self.benchmark).protocol], False
        return s


class BenchRetrievalStage(Stage):
    """Embed a shards split (or a published benchmark) with a trained bundle and write results.json + results.md."""

    Params = BenchRetrievalParams
    inputs = {
        "bundle": "model bundle directory (vse.bundle)",
        "shards?": "shards directory with the split (unless params.benchmark)",
        "dedup?": "the densecap-dedup stage's index of those shards: the results are made again when it changes",
        "data?": "params.benchmark's files as published (a directory, or hf://owner/name where supported)",
        "docci?": "iiw: the DOCCI directory (images/, images_aar/)",
        "dci?": "iiw: the DCI directory (densely_captioned_images/photos/)",
    }
    outputs = {"results": "directory with results.json and results.md"}
    # 3: protocol manifests, bootstrap intervals and query ranks in results.json; the published
    # long-caption benchmarks (params.benchmark, inputs data / docci / dci)
    version = "3"

    def run(self, ctx: StageContext) -> dict:
        p: BenchRetrievalParams = ctx.params
        s = p.settings()
        t0 = time.perf_counter()
        if ctx.inputs.get("dedup") and not ctx.inputs.get("shards"):
            raise DatasetError("inputs.dedup: an index of shards; give it with inputs.shards, not params.benchmark")
        if p.benchmark:
            roots = {_ROOT_INPUTS[k]: str(v) for k, v in ctx.inputs.items() if k in _ROOT_INPUTS and v}
            data = load_benchmark(p.benchmark, roots)
            source = {"bundle": str(ctx.inputs["bundle"]), "benchmark": p.benchmark, **roots}
        elif ctx.inputs.get("shards"):
            data = load_shards(ctx.inputs["shards"], p.split, p.max_captions)
            source = {"bundle": str(ctx.inputs["bundle"]), "shards": str(ctx.inputs["shards"]), "split": p.split}
        else:
            raise DatasetError("inputs.shards: required unless params.benchmark names a published benchmark")
        encoder = load_encoder(ctx.inputs["bundle"], p.device)
        emb = embed_eval_set(encoder, data, s)
        benchmarks = evaluate_embeddings(emb, s, data=data, model=model_info(ctx.inputs["bundle"], encoder))
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
