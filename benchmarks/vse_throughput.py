"""Training throughput of a CPU config: batches streamed from shards vs the same batches in memory.

Both runs do identical training steps (same initial model, recipe, batches, batch size,
thread count); the only difference is where batches come from: the ShardStream (tar reading,
PNG decoding, caption sampling, tokenisation in a data-loader worker) or a list of the same
batches already in memory. The two runs alternate blocks of ``--block`` steps so that drift
of the machine's speed hits both alike. Prints samples/s of both, the trainer's wait for each
batch, the loader's cost alone and the ratio (target >= 0.9: the data pipeline is not the
bottleneck).

    python benchmarks/vse_throughput.py [--model tiny-vit] [--recipe baseline] [--steps 100] [--block 10]
"""

from __future__ import annotations

import argparse
import copy
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--recipe", default="baseline")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--sharing",
        default="file_system",
        choices=["file_system", "file_descriptor"],
        help="how the loader worker hands tensors over (file_descriptor: torch's Linux default)",
    )
    ap.add_argument("--block", type=int, default=10, help="steps per block; the two runs alternate blocks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The shards and assets in the work dir, made when missing."""
    from vse.assets import build_assets

    work = Path(args.work or tempfile.mkdtemp(prefix="vse-bench-"))
    shards = work / "world"
    if not (shards / "manifest.json").exists():
        make_world(shards, args.images)
    assets = work / "assets"
    if not (assets / "assets.json").exists():
        build_assets(shards, assets, [args.model])
    return shards, assets


class Setup:
    """The recipe, the image transform and the shard stream of the benchmark, as the trainer builds them."""

    def __init__(self, args: argparse.Namespace, shards: Path, assets: Path):
        from transformers import AutoImageProcessor, AutoTokenizer

        from d2s.shards import split_shards
        from vse.models import create_model, processor_source, tokenizer_source
        from vse.transforms import ImageTransform, TextTokenizer
        from vse_train.data import Collate, ShardStream
        from vse_train.objective import text_fields
        from vse_train.recipes import get_recipe

        self.args, self.assets = args, assets
        self.recipe = recipe = get_recipe(args.recipe)
        model = create_model(args.model, assets_dir=assets, student_head=recipe.student_head)
        tok = TextTokenizer(AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets)))
        proc = AutoImageProcessor.from_pretrained(processor_source(model.cfg, assets))
        self.transform = ImageTransform.from_processor(
            model.cfg.image.image_size, proc, model.cfg.image.mean, model.cfg.image.std
        )
        collate = Collate(self.transform, tok, text_fields(recipe, model), model.cfg.text.token_aug)
        self.stream = ShardStream(
            split_shards(shards, "train"),
            batch_size=args.batch_size,
            collate=collate,
            seed=0,
            shuffle_buffer=1000,
            need_dense=recipe.needs_dense,
            sharing_strategy=args.sharing,
        )

    def fresh(self):
        """A new model (same initial weights every time), its objective, optimizer and teacher cache."""
        from vse.models import create_model
        from vse_train.objective import Objective
        from vse_train.teacher import TeacherCache

        torch.manual_seed(0)
        model = create_model(self.args.model, assets_dir=self.assets, student_head=self.recipe.student_head)
        obj = Objective(model, self.recipe, steps_per_epoch=10**9)
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
        teacher = None
        if self.recipe.teacher != "none":  # stage 2: a frozen text encoder behind the trainer's cache
            teacher = TeacherCache(copy.deepcopy(model.text).requires_grad_(False).eval())
        return obj, opt, teacher

    def loader(self) -> torch.utils.data.DataLoader:
        w = self.args.workers
        return torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=w, prefetch_factor=4 if w else None
        )


class Side:
    """One training run: its own model and optimizer, fed from ``batches``."""

    def __init__(self, setup: Setup, batches):
        self.obj, self.opt, self.teacher = setup.fresh()
        self.transform = setup.transform
        self.it = iter(batches)
        self.seconds = self.wait = 0.0
        self.steps = 0

    def step(self) -> None:
        tw = time.perf_counter()
        batch = dict(next(self.it))
        self.wait += time.perf_counter() - tw
        batch["pixels"] = self.transform.normalize(batch["pixels"])  # as the trainer does
        teacher_dense = self.teacher(batch["teacher_ids"], batch["teacher_mask"]) if self.teacher else None
        loss, _ = self.obj(batch, 0, teacher_dense)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def block(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        dt = time.perf_counter() - t
        self.seconds += dt
        self.steps += n
        return dt


def loader_alone(setup: Setup, n: int) -> tuple[list, float]:
    """The loader worker alone: ``n`` batches (the same, in the same order, as the shards run will
    get) and its cost per batch with the cores otherwise idle."""
    it = iter(setup.loader())
    memory = [next(it)]  # the first one includes the worker's start
    t = time.perf_counter()
    memory += [next(it) for _ in range(n - 1)]
    return memory, (time.perf_counter() - t) / max(1, len(memory) - 1)


def alternate(mem: Side, shard: Side, blocks: int, block: int, warmup: int) -> list[float]:
    """Both runs advance in alternating blocks, so that drift of the machine's speed (other
    tenants, frequency) hits both alike; the first side of each pair alternates too. Returns
    the in-memory / shards time ratio of each block pair."""
    for side in (mem, shard):
        for _ in range(warmup):
            side.step()
        side.wait = 0.0
    pair_ratios = []
    for b in range(blocks):
        times = {}
        for side in (mem, shard) if b % 2 == 0 else (shard, mem):
            if side is mem:
                time.sleep(0.5)  # the loader's worker fills its prefetch queue and goes idle
            times[id(side)] = side.block(block)
        pair_ratios.append(times[id(mem)] / times[id(shard)])
    return pair_ratios


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging

    args = parse_args(argv)
    setup_logging("WARNING")
    for name in ("vse", "vse_train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    setup = Setup(args, *prepare(args))
    blocks = max(1, args.steps // args.block)
    memory, worker_s = loader_alone(setup, args.warmup + blocks * args.block)
    print(
        f"model {args.model}, recipe {args.recipe}, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.workers} loader worker(s) ({args.sharing}), {blocks} x {args.block} timed steps per side after {args.warmup}"
    )
    print(f"loader alone: {worker_s * 1000:.1f} ms/batch")
    mem, shard = Side(setup, memory), Side(setup, setup.loader())
    q = sorted(alternate(mem, shard, blocks, args.block, args.warmup))
    mem_sps = mem.steps * args.batch_size / mem.seconds
    shard_sps = shard.steps * args.batch_size / shard.seconds
    print(f"in-memory tensors : {mem_sps:8.1f} samples/s ({mem.seconds / mem.steps:.3f} s/step)")
    print(
        f"from shards       : {shard_sps:8.1f} samples/s ({shard.seconds / shard.steps:.3f} s/step, "
        f"{shard.wait / shard.steps * 1000:.1f} ms/step waiting for the next batch)"
    )
    print(f"ratio per block pair: min {q[0]:.3f}, median {q[len(q) // 2]:.3f}, max {q[-1]:.3f}")
    print(f"ratio shards/memory: {shard_sps / mem_sps:.3f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
