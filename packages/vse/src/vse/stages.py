"""Pipeline stage types of the vse package (entry-point group ``d2s.stages``).

``vse-train``: train one recipe from shards; outputs the checkpoint (best on val, else last)
and the inference bundle. The run directory is the stage's work dir, so an interrupted stage
resumes from its saved state when the runner starts it again.

``vse-assets``: the tokenizer + tiny backbones of the CPU configs, built from the shards.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2s.config import to_dict
from d2s.pipeline import Stage, StageContext

from .train import AlignLossOverride, DataConfig, OptimConfig, parse_config, train


@dataclass
class VseTrainParams:
    recipe: str = "baseline"
    model: str = "tiny-vit"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lr_mult: dict[str, float] = field(default_factory=dict)   # over the recipe's (random-init backbones: 1.0)
    align_loss: AlignLossOverride | None = None                # e.g. {kind: infonce} for random-init models
    steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    mixed_precision: str = "no"
    grad_accum: int = 1
    val_every: int | None = None
    save_every: int = 200
    log_every: int = 20
    threads: int | None = None
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'steps' and 'epochs'")


class VseTrainStage(Stage):
    """Train a recipe (baseline | stage1 | stage2 | a recipe file) on the shards."""

    Params = VseTrainParams
    inputs = {
        "shards": "dataset dir (manifest.json; train and val splits)",
        "init?": "checkpoint dir to initialise from (stage 2)",
        "teacher?": "checkpoint dir of a teacher text encoder (recipes with teacher: teacher)",
        "assets?": "assets dir of the tiny configs (vse-assets); default: built in the work dir",
    }
    outputs = {
        "checkpoint": "model checkpoint dir (best on val rSum)",
        "bundle": "inference bundle dir (vse.bundle)",
        "run": "training run dir (metrics.jsonl, summary.json, resumable state, tensorboard)",
    }
    version = "1"

    def run(self, ctx: StageContext) -> dict:
        p: VseTrainParams = ctx.params
        doc = to_dict(p)
        doc.update(shards=ctx.inputs["shards"], out=str(ctx.outputs["run"]))
        for k in ("init", "teacher", "assets"):
            if ctx.inputs.get(k):
                doc[k] = ctx.inputs[k]
        summary = train(parse_config(doc, f"stage {ctx.name!r} params"))
        for name, src in (("checkpoint", Path(summary["checkpoint"])), ("bundle", Path(summary["bundle"]))):
            dst = ctx.outputs[name]
            if dst.resolve() != src.resolve():
                tmp = dst.with_name(dst.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)
        return {k: summary[k] for k in ("recipe", "model", "steps", "seconds", "samples_per_s", "best_rsum", "best_step", "last_loss")}


@dataclass
class VseAssetsParams:
    models: list[str] = field(default_factory=list)   # empty: every locally built config
    seed: int = 0


class VseAssetsStage(Stage):
    """Build the tokenizer (from the shards' texts) and the tiny random backbones."""

    Params = VseAssetsParams
    inputs = {"shards": "dataset dir (texts of the train split feed the tokenizer)"}
    outputs = {"assets": "assets dir for vse-train's assets input"}

    def run(self, ctx: StageContext) -> dict:
        from .assets import build_assets

        p: VseAssetsParams = ctx.params
        dst = ctx.outputs["assets"]
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        summary = build_assets(ctx.inputs["shards"], tmp, p.models or None, seed=p.seed)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        return {"vocab_size": summary["vocab_size"], "models": sorted(summary["models"])}
