"""Stage types that core itself provides (registered in core's pyproject)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pipeline import Stage, StageContext
from .synthetic import SplitSpec, WorldConfig, write_world


@dataclass
class SyntheticWorldParams:
    world: WorldConfig = field(default_factory=WorldConfig)
    train: int = 4000
    val: int = 1000
    test: int = 1000
    pretrain: int = 0  # >0: a fourth split "pretrain" (disjoint images, same world) for vse's backbone pre-training (vse-assets' pretrain_backbones)
    seed: int = 0
    val_group_size: int = 1  # >1: val images come in groups of near-duplicates
    test_group_size: int = 1
    shard_size: int = 1000
    num_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("train", "val", "test", "pretrain"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


class SyntheticWorldStage(Stage):
    """Render train/val/test splits of the synthetic world as shards (sparse captions, no dense yet).

    ``pretrain: N`` adds a fourth split of N images of the same world (its own split id, so no
    image is shared with the others): the data of ``vse-assets``' backbone pre-training."""

    Params = SyntheticWorldParams
    version = "2"  # 2: shard schema version 2 (grounding fields)
    outputs = {"shards": "directory of <split>-NNNNNN.tar shards with manifest.json"}

    def run(self, ctx: StageContext) -> dict:
        p: SyntheticWorldParams = ctx.params
        splits = [
            SplitSpec("train", p.train, p.seed, 1),
            SplitSpec("val", p.val, p.seed, p.val_group_size),
            SplitSpec("test", p.test, p.seed, p.test_group_size),
            SplitSpec("pretrain", p.pretrain, p.seed, 1),
        ]
        manifest = write_world(
            ctx.outputs["shards"],
            p.world,
            [s for s in splits if s.count],
            shard_size=p.shard_size,
            num_workers=p.num_workers,
        )
        return {k: v["count"] for k, v in manifest["splits"].items()}
