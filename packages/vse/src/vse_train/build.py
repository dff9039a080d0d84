"""The parts of a training run, each built whole by one function: the Accelerator, the model
(with its tokenizer and image transform), the run's size, the objective with its optimizer
and schedule, the restored counters, the data loader. :func:`vse_train.train.train` calls
them in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2s.atomic import atomic_write_json
from d2s.config import ConfigError, to_dict
from d2s.integrity import Integrity, read_integrity
from d2s.schema import SampleError
from d2s.shards import split_shards, split_size, split_sparse_count
from vse.checkpoint import load_checkpoint, load_processor, load_tokenizer
from vse.models import VSEModel, create_model, get_model_config, processor_source, tokenizer_source
from vse.transforms import ImageTransform, TextTokenizer

from .config import TrainConfig, TrainSpec
from .data import Collate, ShardStream, check_split_usable
from .history import History, flat_scalars
from .image_thread import ImageThread, draws_no_random_numbers
from .objective import Objective, text_fields
from .recipes import Recipe, get_recipe, with_align_loss, with_warmup
from .schedule import lr_scheduler
from .state import Counters, find_state, load_state
from .teacher import Teacher

log = logging.getLogger(__name__)


def resolve_recipe(cfg: TrainSpec) -> Recipe:
    """The recipe with the config's alignment-loss and warm-up overrides applied."""
    recipe = get_recipe(cfg.recipe)
    if cfg.align_loss is not None:
        recipe = with_align_loss(recipe, cfg.align_loss.kind, cfg.align_loss.params)
    if cfg.warmup_epochs is not None:
        recipe = with_warmup(recipe, cfg.warmup_epochs)
    if cfg.compositions and not recipe.student_head:
        raise ConfigError(
            f"compositions: recipe {recipe.name!r} has no student head, so there is no composition to choose "
            f"(got {cfg.compositions}); leave compositions empty"
        )
    return recipe


def needs_assets(model_name: str, overrides: dict) -> bool:
    """Whether the model config builds a backbone or its tokenizer locally (``vse build-assets``)."""
    cfg = get_model_config(model_name, **overrides)
    return (
        cfg.image.backbone.build is not None or cfg.text.backbone.build is not None or cfg.tokenizer.build is not None
    )


def make_accelerator(cfg: TrainConfig, out: Path):
    """Threads, the Accelerator (devices, precision, accumulation, tracker), the seed, the out dir."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    return accelerator


@dataclass(frozen=True)
class ModelParts:
    """The model and what reads its inputs: HF tokenizer and image processor (saved with every
    checkpoint), the training tokenizer and image transform, the assets dir it was built from."""

    model: VSEModel
    hf_tokenizer: Any
    processor: Any
    tokenizer: TextTokenizer
    transform: ImageTransform
    assets: str | None


def build_model(cfg: TrainConfig, recipe: Recipe, out: Path, accelerator) -> ModelParts:
    """From the init checkpoint, or created from the model config (building the tiny configs'
    assets in ``<out>/assets`` when needed)."""
    assets = cfg.assets
    if recipe.init == "checkpoint":
        if not cfg.init:
            raise ConfigError(f"init: recipe {recipe.name!r} initialises from a checkpoint; pass init=<checkpoint dir>")
        model, init_doc = load_checkpoint(cfg.init, student_head=recipe.student_head)
        if init_doc["model"].get("name") != cfg.model:
            log.info(
                "model: using the init checkpoint's config %r (asked for %r)", init_doc["model"].get("name"), cfg.model
            )
        hf_tokenizer, processor = load_tokenizer(cfg.init), load_processor(cfg.init)
    else:
        if assets is None and needs_assets(cfg.model, cfg.model_overrides):
            assets = str(out / "assets")
            from vse.assets import build_assets, have_assets

            if accelerator.is_main_process and not have_assets(assets, cfg.model):
                build_assets(cfg.shards, assets, [cfg.model])
            accelerator.wait_for_everyone()
        model = create_model(cfg.model, assets_dir=assets, student_head=recipe.student_head, **cfg.model_overrides)
        from transformers import AutoImageProcessor, AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets))
        psrc = processor_source(model.cfg, assets)
        processor = AutoImageProcessor.from_pretrained(psrc) if psrc else None
    icfg = model.cfg.image
    transform = ImageTransform.from_processor(
        icfg.image_size, processor, icfg.mean, icfg.std, random_crop=icfg.random_crop, hflip=icfg.hflip
    )
    return ModelParts(model, hf_tokenizer, processor, TextTokenizer(hf_tokenizer), transform, assets)


def freeze_groups(model: VSEModel, recipe: Recipe) -> None:
    """No gradients for the parameter groups the recipe freezes."""
    for group, params in model.param_groups().items():
        if group in recipe.freeze:
            for _, p in params:
                p.requires_grad_(False)


@dataclass(frozen=True)
class Plan:
    """The run's size: the training split, its epoch in steps, the steps to run, validation spacing."""

    urls: list[str]
    n_train: int
    epoch_size: int
    steps_per_epoch: int
    total_steps: int
    val_every: int | None
    integrity: Integrity | None = None  # the shards' dedup / contamination index (d2s.integrity)


def check_integrity(cfg: TrainConfig, urls: list[str]) -> Integrity:
    """The shards' integrity index: log the duplicates the stream will skip; warn about, or
    refuse (``data.contamination: error``), training images found in an evaluation set."""
    integrity = read_integrity(cfg.shards)
    if integrity:
        log.info("integrity index of %s: %s", cfg.shards, integrity.summary())
    names = {Path(u).name for u in urls}
    flagged = [(k, m) for k, m in sorted(integrity.contaminated.items()) if k[0] in names]
    if flagged and cfg.data.contamination != "ignore":
        lines = [
            f"shard {shard}, key {key!r} matches {m[0]['benchmark']} item {m[0]['item']!r} ({m[0]['method']})"
            for (shard, key), m in flagged
        ]
        msg = (
            f"{len(flagged)} training image(s) of {cfg.shards} split {cfg.data.train_split!r} are in an evaluation "
            f"set (integrity/contamination.json): " + "; ".join(lines[:10]) + (" ..." if len(lines) > 10 else "")
        )
        if cfg.data.contamination == "error":
            raise SampleError(f"data.contamination: error: {msg}")
        log.warning("%s (data.contamination: error refuses to train)", msg)
    return integrity


def plan_data(cfg: TrainConfig, recipe: Recipe, num_processes: int) -> Plan:
    """The training split's shards and the step counts (an epoch in images or sparse captions)."""
    urls = split_shards(cfg.shards, cfg.data.train_split)
    integrity = check_integrity(cfg, urls)
    check_split_usable(urls, recipe.needs_dense, recipe.name)
    n_train = split_size(cfg.shards, cfg.data.train_split)
    epoch_size = n_train if recipe.epoch_unit == "images" else split_sparse_count(cfg.shards, cfg.data.train_split)
    global_batch = cfg.data.batch_size * num_processes * cfg.grad_accum
    steps_per_epoch = max(1, epoch_size // global_batch)
    total_steps = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    val_every = (
        cfg.val_every if cfg.val_every_epochs is None else max(1, int(round(cfg.val_every_epochs * steps_per_epoch)))
    )
    return Plan(urls, n_train, epoch_size, steps_per_epoch, total_steps, val_every, integrity)


@dataclass(frozen=True)
class Optimization:
    """The objective and AdamW as Accelerate prepared them, and the lr schedule."""

    objective: Any  # Objective, wrapped by accelerate (DDP with several processes)
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR


def optimizer_groups(cfg: TrainConfig, recipe: Recipe, objective: Objective) -> list[dict[str, Any]]:
    """AdamW parameter groups: each model group's trainable parameters at lr x its multiplier
    (the config's, else the recipe's), plus learnable loss parameters without weight decay."""
    groups = []
    for group, params in objective.model.param_groups().items():
        trainable = [p for _, p in params if p.requires_grad]
        if trainable:
            mult = cfg.lr_mult.get(group, recipe.lr_mult.get(group, 1.0))
            groups.append({"params": trainable, "lr": cfg.optim.lr * mult, "name": group})
    loss_params = [p for p in objective.losses.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "loss"})
    return groups


def make_image_thread(cfg: TrainConfig, model: VSEModel, accelerator) -> ImageThread | None:
    """The image encoder's second thread (``vse_train.image_thread``: the same numbers bit for bit)
    when the run asks for it and is on CPU in one process, without mixed precision, gradient
    accumulation or a loss scaler; else None."""
    if (
        not cfg.image_thread
        or accelerator.num_processes > 1
        or accelerator.device.type != "cpu"
        or accelerator.mixed_precision != "no"
        or cfg.grad_accum > 1
        or getattr(accelerator, "scaler", None) is not None
    ):
        return None
    return ImageThread(torch.get_num_threads(), forward=draws_no_random_numbers(model.image.backbone))


def build_optimization(cfg: TrainConfig, recipe: Recipe, model: VSEModel, plan: Plan, accelerator) -> Optimization:
    """The objective (model + loss terms, the image thread), AdamW, the lr schedule; prepared by Accelerate."""
    objective = Objective(
        model,
        recipe,
        plan.steps_per_epoch,
        ragged=cfg.data.on_bad_sample == "skip",
        image_thread=make_image_thread(cfg, model, accelerator),
    )
    optimizer = torch.optim.AdamW(
        optimizer_groups(cfg, recipe, objective),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
    )
    scheduler = lr_scheduler(optimizer, cfg.optim, plan.steps_per_epoch, plan.total_steps)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    return Optimization(prepared, optimizer, scheduler)


def run_doc(cfg: TrainConfig, recipe: Recipe, parts: ModelParts, plan: Plan, accelerator) -> dict[str, Any]:
    """``run_config.json``: the resolved config, recipe, model config and the run's sizes."""
    return {
        "train": to_dict(cfg),
        "recipe": to_dict(recipe),
        "model": parts.model.cfg.to_dict(),
        "assets": parts.assets,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # as applied: the config's, else the launcher's
        "steps_per_epoch": plan.steps_per_epoch,
        "epoch_unit": recipe.epoch_unit,
        "epoch_size": plan.epoch_size,
        "total_steps": plan.total_steps,
        "train_size": plan.n_train,
    }


def restore_or_record(cfg: TrainConfig, out: Path, opt: Optimization, doc: dict[str, Any], accelerator) -> Counters:
    """The counters of the newest state in ``<out>/state`` (``resume``), restored with the model,
    optimizer, scheduler and RNG; else fresh ones, and ``doc`` written as run_config.json. Then
    the tracker starts."""
    counters = Counters()
    resume_from = find_state(out / "state") if cfg.resume else None
    if resume_from is not None:
        model = accelerator.unwrap_model(opt.objective)
        counters = load_state(
            resume_from, accelerator=accelerator, model=model, optimizer=opt.optimizer, scheduler=opt.scheduler
        )
        log.info("resumed from %s at step %d (batch %d)", resume_from, counters.step, counters.batches)
    elif accelerator.is_main_process:
        atomic_write_json(out / "run_config.json", doc)
    if cfg.tracker != "none":
        accelerator.init_trackers("vse", config=flat_scalars(doc))
    return counters


def build_loader(
    cfg: TrainConfig, recipe: Recipe, parts: ModelParts, plan: Plan, start_batch: int, accelerator
) -> torch.utils.data.DataLoader:
    """The endless shard stream of this process from data position ``start_batch``, in a DataLoader."""
    collate = Collate(
        parts.transform,
        parts.tokenizer,
        text_fields(recipe, parts.model),
        parts.model.cfg.text.token_aug,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    stream = ShardStream(
        plan.urls,
        batch_size=cfg.data.batch_size,
        collate=collate,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer=cfg.data.shuffle_buffer,
        need_sparse=recipe.needs("sparse"),
        need_dense=recipe.needs_dense,
        start_batch=start_batch,
        caption_sampling=cfg.data.caption_sampling,
        integrity=plan.integrity or None,
    )
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG (restored on resume) untouched
    )


@dataclass(frozen=True)
class Run:
    """What one run is built from, every part complete; :func:`train` builds them in order."""

    cfg: TrainConfig
    out: Path
    recipe: Recipe
    accelerator: Any
    parts: ModelParts
    teacher: Teacher | None
    plan: Plan
    opt: Optimization
    val_urls: list[str] | None
    loader: torch.utils.data.DataLoader
    history: History

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        """The model being trained, outside Accelerate's wrapper."""
        return self.accelerator.unwrap_model(self.opt.objective).model
