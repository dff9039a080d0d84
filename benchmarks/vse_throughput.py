"""Training throughput of a CPU config: batches streamed from shards vs the same batches in memory.

Both runs do identical training steps (same model, recipe, batch size, thread count); the
only difference is where batches come from: the ShardStream (tar reading, PNG decoding,
caption sampling, tokenisation in a data-loader worker) or a list of ready tensors.
Prints samples/s of both and the ratio (target >= 0.9: the data pipeline is not the bottleneck).

    python benchmarks/vse_throughput.py [--model tiny-vit] [--recipe baseline] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch


def make_world(out: Path, n: int) -> Path:
    from d2s.schema import DenseText
    from d2s.shards import ShardWriter, write_manifest
    from d2s.synthetic import SplitSpec, WorldConfig, describe, iter_world

    samples = list(iter_world(WorldConfig(), SplitSpec("train", n, 0)))
    for index, start in enumerate(range(0, n, 512)):
        with ShardWriter(out, "train", index) as w:
            for s in samples[start : start + 512]:
                s.dense = [DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")]
                w.write(s)
    write_manifest(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging
    from d2s.shards import split_shards
    from vse.assets import build_assets
    from vse.data import Collate, ImageTransform, ShardStream, TextTokenizer
    from vse.models import create_model, processor_source, tokenizer_source
    from vse.recipes import get_recipe
    from vse.train import Objective, text_fields

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--recipe", default="baseline")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    args = ap.parse_args(argv)
    setup_logging("WARNING")
    logging.getLogger("vse").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    work = Path(args.work or tempfile.mkdtemp(prefix="vse-bench-"))
    shards = work / "world"
    if not (shards / "manifest.json").exists():
        make_world(shards, args.images)
    assets = work / "assets"
    if not (assets / "assets.json").exists():
        build_assets(shards, assets, [args.model])

    recipe = get_recipe(args.recipe)
    from transformers import AutoImageProcessor, AutoTokenizer

    def fresh():
        torch.manual_seed(0)
        model = create_model(args.model, assets_dir=assets, student_head=recipe.student_head)
        obj = Objective(model, recipe, steps_per_epoch=10**9)
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
        return model, obj, opt

    model, obj, opt = fresh()
    tok = TextTokenizer(AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets)))
    proc = AutoImageProcessor.from_pretrained(processor_source(model.cfg, assets))
    collate = Collate(ImageTransform.from_processor(model.cfg.image.image_size, proc, model.cfg.image.mean, model.cfg.image.std),
                      tok, text_fields(recipe, model), model.cfg.text.token_aug)
    stream = ShardStream(split_shards(shards, "train"), batch_size=args.batch_size, collate=collate, seed=0,
                         shuffle_buffer=1000, need_dense=recipe.needs_dense)

    def run(batches, n_steps: int) -> float:
        it = iter(batches)
        for i in range(args.warmup + n_steps):
            if i == args.warmup:
                t0 = time.perf_counter()
            batch = next(it)
            loss, _ = obj(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return n_steps * args.batch_size / (time.perf_counter() - t0)

    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    memory = []
    it = iter(loader)
    for _ in range(args.warmup + args.steps):
        memory.append(next(it))
    del it
    model, obj, opt = fresh()
    mem_sps = run(memory, args.steps)
    model, obj, opt = fresh()
    shard_sps = run(loader, args.steps)
    print(f"model {args.model}, recipe {args.recipe}, batch {args.batch_size}, {args.threads} thread(s), {args.workers} loader worker(s)")
    print(f"in-memory tensors : {mem_sps:8.1f} samples/s ({args.batch_size / mem_sps:.3f} s/step)")
    print(f"from shards       : {shard_sps:8.1f} samples/s ({args.batch_size / shard_sps:.3f} s/step)")
    print(f"ratio shards/memory: {shard_sps / mem_sps:.3f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
