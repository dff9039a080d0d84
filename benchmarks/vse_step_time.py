"""Time per training step of the quickstart's stage 1 and stage 2, next to a plain forward +
backward of the same model on the same batch, measured in the same run.

The trainer side is the trainer itself: the run is built from the quickstart's own stage
params (pipelines/quickstart.yaml, stages ``stage1`` and ``d2s``) by ``vse_train.train.build_run``
and stepped by ``train_step`` + ``after_step`` from its own data loader (shards, PNG decoding,
tokenisation in the loader worker; the frozen teacher, loss terms, clipping, AdamW, schedule,
loss records). The plain side runs, on the batch the trainer step just used, the model's
forward for the embeddings the recipe trains (images, and the dense or sparse texts) and a
backward of their summed matching similarities: what any training of this model must compute.
The two alternate blocks of ``--block`` steps, so drift of the machine's speed hits both; the
ratio trainer / plain is the trainer's overhead over the model's own cost (the teacher, the
loss terms, the optimizer, the data wait). Each is printed as wall time and as the process's
CPU time (the loader worker's is its own process, on the other core): on a machine other jobs
share, the CPU time is the steadier figure. Stage 2 starts from the benchmark's stage-1 weights.

    python benchmarks/vse_step_time.py [--steps 40] [--block 5] [--fast] [--one-thread]

``--fast`` sets the model config's ``gpo.fast`` (docs/fidelity.md: changes the numbers);
``--one-thread`` turns ``image_thread`` off (the same numbers, the image encoder in the trainer's thread).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side and stage")
    ap.add_argument("--block", type=int, default=5, help="steps per block; the two sides alternate blocks")
    ap.add_argument("--warmup", type=int, default=3, help="untimed trainer steps first (loader start, allocator)")
    ap.add_argument("--images", type=int, default=4000, help="training images of the world (the quickstart's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the quickstart's")
    ap.add_argument("--fast", action="store_true", help="model override gpo.fast=true")
    ap.add_argument(
        "--one-thread", action="store_true", help="image_thread=false: the image encoder in the main thread"
    )
    ap.add_argument("--stages", default="stage1,d2s", help="quickstart stages to time, comma-separated")
    ap.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    return ap.parse_args(argv)


def prepare(work: Path, images: int) -> tuple[Path, Path]:
    """The world's shards (train split with the oracle dense text) and the tiny-vit assets, made when missing."""
    import importlib.util

    from vse.assets import build_assets

    # the world of benchmarks/vse_throughput.py (a sibling script, not a package)
    spec = importlib.util.spec_from_file_location("vse_throughput", REPO / "benchmarks" / "vse_throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)

    shards, assets = work / "world", work / "assets"
    if not (shards / "manifest.json").exists():
        throughput.make_world(shards, images)
    if not (assets / "assets.json").exists():
        build_assets(shards, assets, ["tiny-vit"])
    return shards, assets


def stage_config(stage: str, shards: Path, assets: Path, out: Path, init: str | None, args: argparse.Namespace):
    """The TrainConfig the quickstart's ``stage`` trains with, on the benchmark's shards."""
    from d2s.pipeline import load_pipeline

    params = load_pipeline(REPO / "pipelines" / "quickstart.yaml", run_dir=out / "pipeline").stage(stage).params
    cfg = params.train_config(str(shards), str(out), assets=str(assets), init=init)
    cfg.steps = args.warmup + 2 * args.steps  # no schedule end inside the timed steps
    cfg.val_every = 0
    cfg.save_every = 10**9
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    cfg.image_thread = not args.one_thread
    if args.fast:
        cfg.model_overrides = {**cfg.model_overrides, "gpo.fast": True}
    return cfg


class Trainer:
    """The trainer's own steps, from its own loader; keeps the last batch for the plain side."""

    def __init__(self, cfg):
        from vse_train.train import build_run

        self.run, self.loop = build_run(cfg)
        self.run.opt.objective.train()
        self.it = iter(self.run.loader)
        self.last: dict[str, torch.Tensor] | None = None

    def step(self) -> None:
        from vse_train.train import after_step, train_step

        class Bar:  # after_step's progress bar
            def set_postfix(self, **_):
                pass

        done = False
        while not done:
            batch = next(self.it)
            self.last = {k: v.clone() for k, v in batch.items()}
            done = train_step(self.run, self.loop, batch)
        after_step(self.run, self.loop, Bar())


class Plain:
    """Forward of the embeddings the recipe trains + backward of their summed matching similarities."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.model = trainer.run.unwrapped
        self.transform = trainer.run.parts.transform
        recipe = trainer.run.recipe
        self.text = "dense" if recipe.needs("dense") else "sparse"

    def step(self) -> None:
        b = self.trainer.last
        img = self.model.embed_images(self.transform.normalize(b["pixels"]))
        txt = self.model.embed_texts(b[f"{self.text}_ids"], b[f"{self.text}_mask"], use_student=self.text == "sparse")
        (img * txt).sum().backward()
        self.model.zero_grad(set_to_none=True)


def timed(side, n: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all its threads) of ``n`` steps."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        side.step()
    return time.perf_counter() - t, time.process_time() - c


def measure(trainer: Trainer, plain: Plain, args: argparse.Namespace) -> dict[str, float]:
    """Alternating blocks (the first side alternates too); the plain side runs on the batch of the
    trainer's last step, each block's first plain step on the batch before."""
    for _ in range(args.warmup):
        trainer.step()
    plain.step()
    blocks = max(1, args.steps // args.block)
    total = {(side, clock): 0.0 for side in ("trainer", "plain") for clock in ("wall", "cpu")}
    ratios = []
    for b in range(blocks):
        pair = {}
        for side in (trainer, plain) if b % 2 == 0 else (plain, trainer):
            name = "trainer" if side is trainer else "plain"
            pair[name] = timed(side, args.block)
            total[name, "wall"] += pair[name][0]
            total[name, "cpu"] += pair[name][1]
        ratios.append(pair["trainer"][0] / pair["plain"][0])
    out = {f"{side}_{clock}": v / (blocks * args.block) for (side, clock), v in total.items()}
    return {**out, "median_ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging

    args = parse_args(argv)
    setup_logging("WARNING")
    for name in ("vse", "vse_train", "d2s", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="vse-step-time-"))
    shards, assets = prepare(work, args.images)
    init = None
    print(
        f"quickstart configs on {args.images} training images{', gpo.fast' if args.fast else ''}; "
        f"{args.steps} timed steps per side in blocks of {args.block}, after {args.warmup} trainer steps"
    )
    for stage in args.stages.split(","):
        cfg = stage_config(stage, shards, assets, work / stage, init, args)
        trainer = Trainer(cfg)
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        r = measure(trainer, Plain(trainer), args)
        print(
            f"{stage} ({cfg.recipe}, batch {cfg.data.batch_size}, {torch.get_num_threads()} thread(s), "
            f"{cfg.data.num_workers} loader worker(s)):\n"
            f"  wall: trainer step {r['trainer_wall'] * 1000:7.1f} ms, plain forward + backward "
            f"{r['plain_wall'] * 1000:7.1f} ms, ratio {r['trainer_wall'] / r['plain_wall']:.2f} "
            f"(median over block pairs {r['median_ratio']:.2f})\n"
            f"  cpu:  trainer step {r['trainer_cpu'] * 1000:7.1f} ms, plain forward + backward "
            f"{r['plain_cpu'] * 1000:7.1f} ms, ratio {r['trainer_cpu'] / r['plain_cpu']:.2f} "
            "(this process's CPU time: what the step costs when other jobs share the cores)"
        )
        if stage == "stage1":
            from vse_train.checkpoints import save_model

            init = str(work / "stage1-weights")
            save_model(trainer.run, Path(init), trainer.loop.counters.step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
