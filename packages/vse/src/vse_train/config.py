"""The training spec: typed settings of a run (:class:`TrainSpec`, :class:`TrainConfig`).

``TrainConfig`` is what the ``vse train`` command reads (YAML/JSON + overrides) and what
``accelerate launch -m vse_train.cli train --config`` gets; the ``vse-train`` pipeline stage's
params extend ``TrainSpec`` (same keys) with how to launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from d2s.config import from_dict
from vse.models import GROUPS


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float = 2.0  # 0 disables clipping
    # The reference clips fp16 gradients while they are still multiplied by the loss scale (so in
    # effect at grad_clip / scale); off by default, on to reproduce it. No effect without fp16.
    clip_scaled_grads: bool = False
    schedule: Literal["step", "cosine", "constant"] = "step"
    decay_epochs: list[float] = field(
        default_factory=lambda: [9.0, 15.0, 20.0, 25.0]
    )  # "step": lr x decay_factor at each
    decay_factor: float = 0.3
    warmup_steps: int = 0  # linear warm-up (all schedules)
    min_lr_ratio: float = 0.0  # "cosine": floor as a fraction of lr

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps and grad_clip must be >= 0")


@dataclass
class DataConfig:
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # per process and micro-step
    shuffle_buffer: int = 1000
    num_workers: int = 1
    val_max_images: int | None = 1000
    val_batch_size: int = 256
    # "each": every sparse caption once per caption epoch (the reference); "random": one caption
    # drawn at random per image and pass over the shards.
    caption_sampling: Literal["each", "random"] = "each"
    # a training sample whose image cannot be decoded: "raise" (SampleError naming shard and key)
    # or "skip" (dropped from its batch, counted in metrics.jsonl as data/skipped_samples, logged)
    on_bad_sample: Literal["raise", "skip"] = "raise"
    # training images that `densecap contamination` found in an evaluation set (the shards'
    # integrity/contamination.json): "warn" (one warning naming them: shard, key, benchmark item),
    # "error" (refuse to train with that message) or "ignore". Duplicates named by `densecap dedup` (integrity/dedup.json)
    # are always skipped.
    contamination: Literal["warn", "error", "ignore"] = "warn"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("num_workers must be >= 0 and shuffle_buffer >= 1")


@dataclass
class AlignLossOverride:
    kind: str = "infonce"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSpec:
    """What to train and how: every training setting except where the data and outputs are.

    The one training spec: :class:`TrainConfig` (the ``vse train`` command, ``accelerate
    launch -m vse_train.cli train``) adds the run's paths to it, and the ``vse-train`` pipeline
    stage's params (``vse_train.stages.VseTrainParams``) add how to launch, taking the paths
    from the stage's inputs and outputs.
    """

    recipe: str = "baseline"  # registered name or a recipe file
    model: str = "tiny-vit"  # registered name or a model config file
    model_overrides: dict[str, Any] = field(default_factory=dict)  # {"text.max_length": 16, ...}
    lr_mult: dict[str, float] = field(default_factory=dict)  # per-group lr multipliers, over the recipe's
    align_loss: AlignLossOverride | None = None  # replace the recipe's alignment loss terms (e.g. infonce)
    warmup_epochs: float | None = None  # set the recipe's warm-up (hardest-negative switch, alignment ramp)
    steps: int | None = None  # optimizer steps; else epochs x steps per epoch
    epochs: float | None = None
    seed: int = 0
    # None: what the launcher says (`accelerate launch --mixed_precision`, `accelerate config`), else "no"
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    cpu: bool = False  # force CPU (gloo between processes under torchrun/accelerate launch)
    grad_accum: int = 1
    log_every: int = 20  # steps between loss/lr/throughput records (metrics.jsonl, tracker, log line)
    val_every: int | None = None  # steps; None: only at the end; 0: never
    val_every_epochs: float | None = None  # instead of val_every: every this many epochs (the reference: 1)
    save_every: int = 200  # steps between resumable states (and at the end)
    resume: bool = True  # continue from <out>/state when it exists
    threads: int | None = None  # torch.set_num_threads per process
    # On CPU in one process: the image encoder's forward and backward in a second thread next to
    # the text encoders' (vse_train.image_thread); the same numbers bit for bit, so on by default.
    image_thread: bool = True
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    # Student-head recipes: also validate under these compositions of the head's output at
    # evaluation ("l2": c + h/|h|, the reference's; "raw": c + h, as in training) and keep each
    # one's best checkpoint and bundle (<out>/best-<c>, <out>/bundle-<c>), chosen on val under
    # it. [] (the reference): the model config's combine_eval only (best/, bundle/).
    compositions: list[Literal["l2", "raw"]] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'steps' and 'epochs'")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.grad_accum < 1 or self.save_every < 1 or self.log_every < 1:
            raise ValueError("grad_accum, save_every and log_every must be >= 1")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError("warmup_epochs must be >= 0")
        if self.val_every_epochs is not None and (self.val_every_epochs <= 0 or self.val_every is not None):
            raise ValueError("val_every_epochs must be > 0, and not set together with val_every")

        if len(set(self.compositions)) != len(self.compositions):
            raise ValueError(f"compositions: each at most once, got {self.compositions}")
        bad = sorted(set(self.lr_mult) - set(GROUPS))
        if bad:
            raise ValueError(f"lr_mult: unknown parameter group(s) {bad}; groups: {list(GROUPS)}")


@dataclass(kw_only=True)
class TrainConfig(TrainSpec):
    """A :class:`TrainSpec` plus the run's paths: what :func:`vse_train.train.train` runs."""

    shards: str
    out: str
    assets: str | None = None  # assets dir for locally built configs (default: <out>/assets)
    init: str | None = None  # checkpoint dir (recipes with init: checkpoint)
    teacher: str | None = None  # checkpoint dir (recipes with teacher: teacher)


def parse_config(doc: dict[str, Any], where: str = "train config") -> TrainConfig:
    return from_dict(TrainConfig, doc, where)
