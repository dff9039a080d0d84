"""The ``vse`` command: train, export, build-assets, models, recipes.

Examples::

    vse build-assets --shards data/world --out runs/assets
    vse build-assets --shards data/world --out runs/assets --pretrain-split pretrain   # + backbone pre-training
    vse train --recipe stage1 --model tiny-vit --shards data/world --out runs/s1 --steps 300
    vse train --recipe stage2 --shards data/world --out runs/s2 --steps 300 init=runs/s1/best
    vse train --config my_run.yaml optim.lr=1e-3 data.batch_size=64
    accelerate launch --num_processes 2 --cpu -m vse_train.cli train ...      # 2 processes (gloo)
    vse export runs/s2/best runs/s2/bundle
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from d2s.config import ConfigError, apply_overrides, load_yaml
from d2s.log import add_log_level
from d2s.schema import SampleError

from .state import StateError

log = logging.getLogger(__name__)


def _train_doc(args: argparse.Namespace) -> dict:
    doc: dict = {}
    if args.config:
        p = Path(args.config)
        doc = json.loads(p.read_text()) if p.suffix == ".json" else load_yaml(p)
    for key in ("recipe", "model", "shards", "out", "assets", "init", "teacher", "steps", "epochs", "seed"):
        v = getattr(args, key)
        if v is not None:
            doc[key] = v
    if args.batch_size is not None:
        doc.setdefault("data", {})["batch_size"] = args.batch_size
    if args.lr is not None:
        doc.setdefault("optim", {})["lr"] = args.lr
    apply_overrides(doc, args.overrides)
    return doc


def _build_assets(args: argparse.Namespace) -> dict:
    from d2s.config import from_dict
    from vse.assets import build_assets

    from .backbone_pretrain import RECORD, BackbonePretrainParams, check_split, pretrain_backbones, summary

    pretrain = None
    steps = {"image_steps": args.pretrain_image_steps, "text_steps": args.pretrain_text_steps}
    if args.pretrain_split is not None:
        doc = {"split": args.pretrain_split, "seed": args.seed, **{k: v for k, v in steps.items() if v is not None}}
        # a bad value fails before any work, and so does a missing split
        pretrain = from_dict(BackbonePretrainParams, doc, "build-assets --pretrain")
        check_split(args.shards, pretrain.split)
    elif any(v is not None for v in steps.values()):
        raise ConfigError("build-assets: --pretrain-image-steps / --pretrain-text-steps need --pretrain-split")
    result = build_assets(args.shards, args.out, args.model, seed=args.seed)
    for name in result["models"]:
        (Path(args.out) / name / RECORD).unlink(missing_ok=True)  # the backbones were just rebuilt at random
        if pretrain is not None:
            done = pretrain_backbones(args.out, args.shards, name, pretrain)
            result.setdefault("pretrain_backbones", {})[name] = summary(done)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vse", description="D2S-VSE training (stage 1, stage 2, baseline)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model with a recipe (resumes from <out>/state when present)")
    t.add_argument("--config", help="YAML/JSON file of TrainConfig fields")
    t.add_argument("--recipe", help="recipe name (vse recipes) or file")
    t.add_argument("--model", help="model config name (vse models) or file")
    t.add_argument("--shards", help="dataset dir with manifest.json")
    t.add_argument("--out", help="output dir")
    t.add_argument("--assets", help="assets dir for locally built (tiny) configs; default <out>/assets")
    t.add_argument("--init", help="checkpoint dir to initialise from (stage 2)")
    t.add_argument("--teacher", help="checkpoint dir of the teacher (recipes with teacher: teacher)")
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", type=int, help="per-process batch size (data.batch_size)")
    t.add_argument("--lr", type=float, help="base learning rate (optim.lr)")
    t.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of TrainConfig fields, e.g. optim.schedule=cosine")

    e = sub.add_parser("export", help="export an inference bundle from a checkpoint dir")
    e.add_argument("checkpoint")
    e.add_argument("out")

    _add_build_assets(sub)
    sub.add_parser("models", help="list model configs")
    sub.add_parser("recipes", help="list recipes")
    add_log_level(parser, sub)
    return parser


def _add_build_assets(sub) -> None:
    a = sub.add_parser("build-assets", help="build the tokenizer + tiny backbones of the CPU configs from shards")
    a.add_argument("--shards", required=True)
    a.add_argument("--out", required=True)
    a.add_argument(
        "--model", action="append", help="only this model config (repeatable); default: all locally built ones"
    )
    a.add_argument("--seed", type=int, default=0)
    a.add_argument(
        "--pretrain-split",
        help="then pre-train the backbones on this split (vse_train.backbone_pretrain; e.g. pretrain)",
    )
    a.add_argument(
        "--pretrain-image-steps", type=int, help="image tagging steps (default: BackbonePretrainParams.image_steps)"
    )
    a.add_argument(
        "--pretrain-text-steps", type=int, help="masked-LM steps (default: BackbonePretrainParams.text_steps)"
    )


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "train":
        from .config import parse_config
        from .train import train

        print(json.dumps(train(parse_config(_train_doc(args))), indent=2))
    elif args.cmd == "export":
        from vse.bundle import export_bundle

        print(export_bundle(args.checkpoint, args.out))
    elif args.cmd == "build-assets":
        print(json.dumps(_build_assets(args), indent=2))
    elif args.cmd == "models":
        from vse.models import get_model_config, list_models

        for name in list_models():
            print(f"{name:28s} {get_model_config(name).description}")
    elif args.cmd == "recipes":
        from .recipes import get_recipe, list_recipes

        for name in list_recipes():
            print(f"{name:12s} {get_recipe(name).description}")


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging

    parser = _parser()
    # KEY=VALUE overrides may sit anywhere among the train options
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if args.cmd != "train" or "=" not in e or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.cmd == "train":
        args.overrides = list(args.overrides) + extra
    setup_logging(args.log_level)
    try:
        _run(args)
    except (ConfigError, FileNotFoundError, SampleError, StateError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
