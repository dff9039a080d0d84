"""The training loop: one function for every recipe, driven by a typed :class:`TrainConfig`.

Accelerate handles devices, mixed precision, gradient accumulation, processes and the
tracker. Embeddings are gathered across processes WITH gradient
(``torch.distributed.nn.functional.all_gather``) so the loss sees the global batch, as a
single process with the same batch would; DDP then averages the parameter gradients.

Output directory::

    run_config.json   the resolved TrainConfig + recipe + model config (plain JSON)
    assets/           tokenizer + tiny backbones, when the model builds them locally
    state/            resumable states, safetensors + JSON only (vse.state: model, optimizer, scheduler, RNG, progress)
    last/             model checkpoint of the last step           (vse.checkpoint layout)
    best/             model checkpoint with the best val rSum       (only when validating)
    bundle/           inference bundle exported from best (or last)
    logs/             TensorBoard
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from d2s.config import ConfigError, from_dict, to_dict
from d2s.shards import atomic_write_json, atomic_write_text, split_shards, split_size, split_sparse_count

from .checkpoint import load_checkpoint, load_processor, load_tokenizer, save_checkpoint
from .data import Collate, ImageTransform, ShardStream, TextField, TextTokenizer, check_split_usable, iter_eval_batches
from .losses import build_loss
from .models import GROUPS, VSEModel, create_model, get_model_config, l2norm, processor_source, tokenizer_source
from .recipes import Recipe, get_recipe, with_align_loss, with_warmup
from .state import find_state, load_state
from .state import save_state as write_state

log = logging.getLogger(__name__)


# ---- configuration ----------------------------------------------------------------------


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
class TrainConfig:
    shards: str
    out: str
    recipe: str = "baseline"  # registered name or a recipe file
    model: str = "tiny-vit"  # registered name or a model config file
    model_overrides: dict[str, Any] = field(default_factory=dict)  # {"text.max_length": 16, ...}
    lr_mult: dict[str, float] = field(default_factory=dict)  # per-group lr multipliers, over the recipe's
    align_loss: AlignLossOverride | None = None  # replace the recipe's alignment loss terms (e.g. infonce)
    warmup_epochs: float | None = None  # set the recipe's warm-up (hardest-negative switch, alignment ramp)
    assets: str | None = None  # assets dir for locally built configs (default: <out>/assets)
    init: str | None = None  # checkpoint dir (recipes with init: checkpoint)
    teacher: str | None = None  # checkpoint dir (recipes with teacher: teacher)
    steps: int | None = None  # optimizer steps; else epochs x steps per epoch
    epochs: float | None = None
    seed: int = 0
    # None: what the launcher says (`accelerate launch --mixed_precision`, `accelerate config`), else "no"
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    cpu: bool = False  # force CPU (gloo between processes under torchrun/accelerate launch)
    grad_accum: int = 1
    log_every: int = 20
    val_every: int | None = None  # steps; None: only at the end; 0: never
    val_every_epochs: float | None = None  # instead of val_every: every this many epochs (the reference: 1)
    save_every: int = 200  # steps between resumable states (and at the end)
    resume: bool = True  # continue from <out>/state when it exists
    threads: int | None = None  # torch.set_num_threads per process
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kill_at_step: int | None = None  # testing only: SIGKILL this process after that step

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

        bad = sorted(set(self.lr_mult) - set(GROUPS))
        if bad:
            raise ValueError(f"lr_mult: unknown parameter group(s) {bad}; groups: {list(GROUPS)}")


def parse_config(doc: dict[str, Any], where: str = "train config") -> TrainConfig:
    return from_dict(TrainConfig, doc, where)


# ---- pieces ------------------------------------------------------------------------------


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "step":
        epoch = step / max(1, steps_per_epoch)
        return warm * cfg.decay_factor ** sum(epoch >= e for e in cfg.decay_epochs)
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every process; gradients flow back to each process's own part.
    ``sizes``: rows of ``x`` on each process when they may differ (``gathered_sizes``; a batch
    that skipped a bad sample), None when every process holds as many."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    if sizes is None or len(set(sizes)) == 1:
        return torch.cat(all_gather(x), dim=0)
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]) if x.shape[0] < max(sizes) else x
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), sizes)], dim=0)


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    sizes = sizes or [x.shape[0]] * dist.get_world_size()
    if x.shape[0] < max(sizes):
        x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gathered_sizes(x: torch.Tensor) -> list[int] | None:
    """Rows of ``x`` on every process (one small all_gather); None with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    parts = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, n)
    return [int(p) for p in parts]


class Objective(nn.Module):
    """The model plus the recipe's loss terms; ``forward(batch, step)`` -> (total, {term: value}).

    It is what DDP wraps, so learnable loss parameters (an InfoNCE temperature) are synchronised too.
    """

    def __init__(self, model: VSEModel, recipe: Recipe, steps_per_epoch: int, ragged: bool = False):
        super().__init__()
        self.ragged = ragged  # batches may differ in size between processes (skipped bad samples)
        self.model = model
        self.recipe = recipe
        self.losses = nn.ModuleList(
            build_loss(s.kind, s.params, steps_per_epoch, f"recipe.losses[{i}]") for i, s in enumerate(recipe.losses)
        )
        self.names = [f"{s.kind}_{s.inputs[0]}_{s.inputs[1]}" for s in recipe.losses]

        self.ramp_steps = [s.ramp_epochs * steps_per_epoch for s in recipe.losses]

    def embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The recipe's embeddings, text ones before their final L2 norm (images are unit vectors)."""
        r, m = self.recipe, self.model
        out: dict[str, torch.Tensor] = {}
        if r.needs("image"):
            out["image"] = m.embed_images(batch["pixels"])
        if r.needs("sparse"):
            out["sparse"] = m.embed_texts(batch["sparse_ids"], batch["sparse_mask"], use_student=True, normalize=False)
        if r.needs("dense"):
            out["dense"] = m.embed_texts(batch["dense_ids"], batch["dense_mask"], use_student=False, normalize=False)
        return out

    def forward(self, batch: dict[str, torch.Tensor], step: int, teacher_dense: torch.Tensor | None = None):
        sizes = gathered_sizes(batch["image_ids"]) if self.ragged else None
        raw = {k: gather_with_grad(v, sizes) for k, v in self.embeddings(batch).items()}
        if teacher_dense is not None:
            raw["teacher_dense"] = gather_no_grad(teacher_dense, sizes)
        unit = {k: l2norm(v.float()) for k, v in raw.items()}
        ids = gather_no_grad(batch["image_ids"], sizes)
        parts = {}
        total = 0.0
        for name, spec, loss, ramp in zip(self.names, self.recipe.losses, self.losses, self.ramp_steps):
            embs = unit if loss.arity == "align" else raw  # distillation sees them unnormalised
            value = loss(embs[spec.inputs[0]], embs[spec.inputs[1]], ids, step)
            parts[name] = value.detach()
            total = total + spec.weight * ramp_factor(step, ramp) * value
        return total, parts


def ramp_factor(step: int, ramp_steps: float) -> float:
    """Weight multiplier at optimizer step ``step`` (0-based): step / ramp_steps, then 1."""
    return min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0


class Progress:
    """The data position and bookkeeping of a run, saved with the resumable state."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.batches = 0  # micro-batches consumed (the data position)
        self.best_rsum = -1.0
        self.best_step = -1
        self.skipped_samples = 0  # training samples dropped as unreadable (on_bad_sample: skip), all processes

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def text_fields(recipe: Recipe, model: VSEModel) -> dict[str, TextField]:
    t = model.cfg.text
    fields = {}
    if recipe.needs("sparse"):
        fields["sparse"] = TextField("sparse", t.max_length, augment=True)
    if recipe.needs("dense"):
        fields["dense"] = TextField("dense", t.dense_max_length, augment=True)
    if recipe.needs("teacher_dense"):
        fields["teacher"] = TextField("dense", t.dense_max_length, augment=recipe.teacher_augment)
    return fields


@torch.no_grad()
def evaluate(
    model: VSEModel, urls: list[str], tokenizer: TextTokenizer, transform: ImageTransform, data: DataConfig, device
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on an evaluation split (all sparse captions of each image)."""
    from d2s.retrieval import retrieval_metrics

    was_training = model.training
    model.eval()
    imgs, txts, owner = [], [], []
    n = 0
    for samples, shards in iter_eval_batches(urls, data.val_batch_size, data.val_max_images, with_shards=True):
        px = transform.normalize(
            transform.decode([s.image for s in samples], names=list(zip(shards, (s.key for s in samples)))).to(device)
        )
        imgs.append(model.embed_images(px).float().cpu())
        caps = [c for s in samples for c in s.sparse]
        owner += [n + i for i, s in enumerate(samples) for _ in s.sparse]
        n += len(samples)
        for j in range(0, len(caps), data.val_batch_size):
            ids, mask = tokenizer(caps[j : j + data.val_batch_size], model.cfg.text.max_length)
            txts.append(model.embed_texts(ids.to(device), mask.to(device)).float().cpu())
    model.train(was_training)
    metrics = retrieval_metrics(torch.cat(imgs), torch.cat(txts), torch.tensor(owner, dtype=torch.long))
    return {k: float(v) for k, v in metrics.to_dict().items()}


def _needs_assets(model_name: str, overrides: dict) -> bool:
    cfg = get_model_config(model_name, **overrides)
    return (
        cfg.image.backbone.build is not None or cfg.text.backbone.build is not None or cfg.tokenizer.build is not None
    )


# ---- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict. Works under ``accelerate launch``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).resolve()
    recipe = get_recipe(cfg.recipe)
    if cfg.align_loss is not None:
        recipe = with_align_loss(recipe, cfg.align_loss.kind, cfg.align_loss.params)
    if cfg.warmup_epochs is not None:
        recipe = with_warmup(recipe, cfg.warmup_epochs)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    # --- model, tokenizer, teacher: from the recipe's sources
    assets = cfg.assets
    if recipe.init == "checkpoint":
        if not cfg.init:
            raise ConfigError(f"init: recipe {recipe.name!r} initialises from a checkpoint; pass init=<checkpoint dir>")
        model, init_doc = load_checkpoint(cfg.init, student_head=recipe.student_head)
        if init_doc["model"].get("name") != cfg.model:
            log.info(
                "model: using the init checkpoint's config %r (asked for %r)", init_doc["model"].get("name"), cfg.model
            )
        hf_tokenizer = load_tokenizer(cfg.init)
        processor = load_processor(cfg.init)
    else:
        if assets is None and _needs_assets(cfg.model, cfg.model_overrides):
            assets = str(out / "assets")
            from .assets import build_assets, have_assets

            if main and not have_assets(assets, cfg.model):
                build_assets(cfg.shards, assets, [cfg.model])
            accelerator.wait_for_everyone()
        model = create_model(cfg.model, assets_dir=assets, student_head=recipe.student_head, **cfg.model_overrides)
        from transformers import AutoImageProcessor, AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets))
        psrc = processor_source(model.cfg, assets)
        processor = AutoImageProcessor.from_pretrained(psrc) if psrc else None
    teacher = None
    teacher_sha = None
    if recipe.teacher != "none":
        src = cfg.init if recipe.teacher == "init" else cfg.teacher
        if not src:
            raise ConfigError(
                f"teacher: recipe {recipe.name!r} needs a teacher checkpoint; pass teacher=<checkpoint dir>"
            )
        teacher = (
            copy.deepcopy(model.text) if recipe.teacher == "init" else load_checkpoint(src, student_head=False)[0].text
        )
        teacher = freeze_teacher(teacher, recipe.teacher_mode).to(accelerator.device)
        teacher_sha = state_fingerprint(teacher)
    teacher_cache = TeacherCache(teacher) if teacher is not None and recipe.deterministic_teacher else None
    for group, params in model.param_groups().items():
        if group in recipe.freeze:
            for _, p in params:
                p.requires_grad_(False)

    # --- data
    urls = split_shards(cfg.shards, cfg.data.train_split)
    check_split_usable(urls, recipe.needs_dense, recipe.name)
    n_train = split_size(cfg.shards, cfg.data.train_split)
    epoch_size = n_train if recipe.epoch_unit == "images" else split_sparse_count(cfg.shards, cfg.data.train_split)
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.grad_accum
    steps_per_epoch = max(1, epoch_size // global_batch)
    total_steps = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    val_every = (
        cfg.val_every if cfg.val_every_epochs is None else max(1, int(round(cfg.val_every_epochs * steps_per_epoch)))
    )
    tokenizer = TextTokenizer(hf_tokenizer)
    icfg = model.cfg.image
    transform = ImageTransform.from_processor(
        icfg.image_size, processor, icfg.mean, icfg.std, random_crop=icfg.random_crop, hflip=icfg.hflip
    )
    collate = Collate(
        transform, tokenizer, text_fields(recipe, model), model.cfg.text.token_aug, on_bad_sample=cfg.data.on_bad_sample
    )

    # --- optimisation
    objective = Objective(model, recipe, steps_per_epoch, ragged=cfg.data.on_bad_sample == "skip")
    groups = []
    for group, params in model.param_groups().items():
        trainable = [p for _, p in params if p.requires_grad]
        if trainable:
            mult = cfg.lr_mult.get(group, recipe.lr_mult.get(group, 1.0))
            groups.append({"params": trainable, "lr": cfg.optim.lr * mult, "name": group})
    loss_params = [p for p in objective.losses.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "loss"})
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim, steps_per_epoch, total_steps)
    )
    objective, optimizer = accelerator.prepare(objective, optimizer)
    progress = Progress()

    run_doc = {
        "train": to_dict(cfg),
        "recipe": to_dict(recipe),
        "model": model.cfg.to_dict(),
        "assets": assets,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # as applied: the config's, else the launcher's
        "steps_per_epoch": steps_per_epoch,
        "epoch_unit": recipe.epoch_unit,
        "epoch_size": epoch_size,
        "total_steps": total_steps,
        "train_size": n_train,
    }
    state_root = out / "state"
    resume_from = find_state(state_root) if cfg.resume else None
    if resume_from is not None:
        progress.load_state_dict(
            load_state(
                resume_from,
                accelerator=accelerator,
                model=accelerator.unwrap_model(objective),
                optimizer=optimizer,
                scheduler=scheduler,
            )
        )
        log.info("resumed from %s at step %d (batch %d)", resume_from, progress.step, progress.batches)
    elif main:
        atomic_write_json(out / "run_config.json", run_doc)
    if cfg.tracker != "none":
        accelerator.init_trackers("vse", config=_flat_scalars(run_doc))

    val_urls = None
    if val_every != 0:
        try:
            import d2s.retrieval  # noqa: F401

            val_urls = split_shards(cfg.shards, cfg.data.val_split)
        except KeyError:
            log.warning(
                "no %r split in %s: no validation, the last checkpoint is the result", cfg.data.val_split, cfg.shards
            )
        except ImportError:
            log.warning("d2s.retrieval is not installed: no validation, the last checkpoint is the result")

    stream = ShardStream(
        urls,
        batch_size=cfg.data.batch_size,
        collate=collate,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer=cfg.data.shuffle_buffer,
        need_sparse=recipe.needs("sparse"),
        need_dense=recipe.needs_dense,
        start_batch=progress.batches,
        caption_sampling=cfg.data.caption_sampling,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG (restored on resume) untouched
    )
    unwrapped: VSEModel = accelerator.unwrap_model(objective).model
    extra = {"recipe": to_dict(recipe), "train": to_dict(cfg)}

    def save_model(path: Path, metrics: dict | None = None) -> None:
        save_checkpoint(
            path,
            unwrapped,
            tokenizer=hf_tokenizer,
            processor=processor,
            extra={**extra, "step": progress.step, "metrics": metrics or {}},
        )

    def save_state() -> None:
        sync_skipped()
        write_state(
            state_root,
            progress.step,
            accelerator=accelerator,
            model=accelerator.unwrap_model(objective),
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress.state_dict(),
        )

    skipped_here = 0  # this process's skipped samples not yet added to progress.skipped_samples

    def sync_skipped() -> None:
        nonlocal skipped_here
        n = torch.tensor([skipped_here], device=accelerator.device, dtype=torch.long)
        if accelerator.num_processes > 1:
            n = accelerator.reduce(n, reduction="sum")
        progress.skipped_samples += int(n.item())
        skipped_here = 0

    def validate() -> dict | None:
        metrics = None
        if val_urls is not None and main:
            metrics = evaluate(unwrapped, val_urls, tokenizer, transform, cfg.data, accelerator.device)
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress.step)
            history.write(progress.step, {f"val/{k}": v for k, v in metrics.items()})
            log.info(
                "step %d val rsum %.2f (i2t R@1 %.1f, t2i R@1 %.1f)",
                progress.step,
                metrics["rsum"],
                metrics["i2t_r1"],
                metrics["t2i_r1"],
            )
            if metrics["rsum"] > progress.best_rsum:
                progress.best_rsum, progress.best_step = metrics["rsum"], progress.step
                save_model(out / "best", metrics)
        accelerator.wait_for_everyone()
        return metrics

    from tqdm import tqdm

    objective.train()
    history = History(out / "metrics.jsonl", progress.step, main)
    t0, seen0, step0 = time.time(), progress.batches, progress.step
    running: dict[str, float] = {}
    first_loss = last_loss = None
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"vse {recipe.name}", disable=not main, unit="step")
    it = iter(loader)
    while progress.step < total_steps:
        batch = next(it)
        progress.batches += 1
        skipped_here += int(batch.pop("skipped", torch.zeros(())).sum())
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        batch["pixels"] = transform.normalize(batch["pixels"])  # uint8 from the loader
        teacher_dense = None
        if teacher_cache is not None:
            teacher_dense = teacher_cache(batch["teacher_ids"], batch["teacher_mask"])
        elif teacher is not None:
            with torch.no_grad(), accelerator.autocast():
                teacher_dense = teacher(batch["teacher_ids"], batch["teacher_mask"], normalize=False).float()
        with accelerator.accumulate(objective):
            with accelerator.autocast():
                loss, parts = objective(batch, progress.step, teacher_dense)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                clip_gradients(accelerator, objective.parameters(), cfg.optim)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + float(v)
        running["total"] = running.get("total", 0.0) + float(loss.detach())
        running["n"] = running.get("n", 0) + 1
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        progress.step += 1
        bar.update(1)
        if progress.step % cfg.log_every == 0 or progress.step == total_steps:
            n = running.pop("n")
            means = {f"loss/{k}": v / n for k, v in running.items()}
            running = {}
            means["lr"] = scheduler.get_last_lr()[0]
            means["samples_per_s"] = (
                (progress.batches - seen0)
                * cfg.data.batch_size
                * accelerator.num_processes
                / max(1e-9, time.time() - t0)
            )
            if cfg.data.on_bad_sample == "skip":
                sync_skipped()
                means["data/skipped_samples"] = progress.skipped_samples
            accelerator.log(means, step=progress.step)
            history.write(progress.step, means)
            bar.set_postfix(loss=f"{means['loss/total']:.3f}")
            last_loss = means["loss/total"]
            if first_loss is None:
                first_loss = last_loss
        if val_every and progress.step % val_every == 0 and progress.step < total_steps:
            validate()
        if progress.step % cfg.save_every == 0 and progress.step < total_steps:
            save_state()
        if cfg.kill_at_step is not None and progress.step == cfg.kill_at_step:
            log.warning("kill_at_step=%d: killing this process (test of resumption)", progress.step)
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    elapsed = time.time() - t0
    metrics = validate() if progress.step > 0 else None
    if main:
        save_model(out / "last", metrics)
    save_state()
    result_dir = out / "best" if (out / "best").exists() else out / "last"
    if main:
        from .bundle import export_bundle

        export_bundle(result_dir, out / "bundle")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {
        "recipe": recipe.name,
        "model": model.cfg.name,
        "steps": progress.step,
        "steps_this_run": progress.step - step0,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(
            (progress.batches - seen0) * cfg.data.batch_size * accelerator.num_processes / max(1e-9, elapsed), 1
        ),
        "first_loss": first_loss,
        "last_loss": last_loss,
        "best_rsum": progress.best_rsum if progress.best_step >= 0 else None,
        "best_step": progress.best_step if progress.best_step >= 0 else None,
        "final_metrics": metrics,
        "mixed_precision": accelerator.mixed_precision,
        "skipped_samples": progress.skipped_samples,
        "teacher_sha": [teacher_sha, state_fingerprint(teacher)] if teacher is not None else None,
        "teacher_cache": {"hits": teacher_cache.hits, "misses": teacher_cache.misses} if teacher_cache else None,
        "checkpoint": str(result_dir),
        "bundle": str(out / "bundle"),
    }
    if main:
        atomic_write_json(out / "summary.json", summary)
    return summary


def freeze_teacher(teacher: nn.Module, mode: str) -> nn.Module:
    """The frozen teacher, no gradients, in ``mode``. In "train" mode (the reference's) dropout
    is active and BatchNorm normalises with batch statistics, but its running statistics are
    not updated (``track_running_stats`` off), so the teacher's state stays bit-identical."""
    teacher.requires_grad_(False)
    if mode == "eval":
        return teacher.eval()
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    return teacher


def clip_gradients(accelerator, params, cfg: OptimConfig) -> None:
    """Clip to ``cfg.grad_clip``. With ``clip_scaled_grads`` and an fp16 loss scaler, clip the
    gradients as they are (still scaled), as the reference does; otherwise unscale first."""
    if cfg.clip_scaled_grads and getattr(accelerator, "scaler", None) is not None:
        torch.nn.utils.clip_grad_norm_(list(params), cfg.grad_clip)
    else:
        accelerator.clip_grad_norm_(params, cfg.grad_clip)


class TeacherCache:
    """Embeddings of the frozen teacher, computed once per distinct (unaugmented) dense text.

    The teacher never changes and its input is the tokenized dense text without
    augmentation, so an embedding can be reused every time the same text comes back (each
    epoch): only the texts of a batch not seen before go through the teacher. Entries are
    keyed by the text's token ids; memory is one embedding per training text.
    """

    def __init__(self, teacher: nn.Module, max_entries: int = 2_000_000):
        self.teacher = teacher
        self.max_entries = max_entries
        self.table: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).tolist()
        keys = [ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self.table]
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            width = max(lengths[i] for i in todo)
            idx = torch.tensor(todo, device=ids.device)
            emb = self.teacher(ids[idx, :width], mask[idx, :width], normalize=False)
            for j, i in enumerate(todo):
                fresh[i] = emb[j]
                if len(self.table) < self.max_entries:
                    self.table[keys[i]] = emb[j]
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([fresh[i] if i in fresh else self.table[k] for i, k in enumerate(keys)])


class History:
    """``metrics.jsonl`` in the run dir: one line per log step and per validation.

    On resume, lines past the restored step are dropped first, so the file always
    describes exactly one run from step 0 (what the report's training curves plot).
    """

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, bytes): equal iff bit-identical."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _flat_scalars(doc: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = json.dumps(v)
    return out
