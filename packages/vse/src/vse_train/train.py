"""The training loop: one function for every recipe, driven by a typed :class:`TrainConfig`.

Accelerate handles devices, mixed precision, gradient accumulation, processes and the
tracker. Embeddings are gathered across processes WITH gradient
(``torch.distributed.nn.functional.all_gather``) so the loss sees the global batch, as a
single process with the same batch would; DDP then averages the parameter gradients.

Output directory::

    run_config.json   the resolved TrainConfig + recipe + model config (plain JSON)
    assets/           tokenizer + tiny backbones, when the model builds them locally
    state/            resumable states, safetensors + JSON only (vse_train.state: model, optimizer, scheduler, RNG, progress)
    last/             model checkpoint of the last step           (vse.checkpoint layout)
    best/             model checkpoint with the best val rSum       (only when validating)
    bundle/           inference bundle exported from best (or last)
    logs/             TensorBoard
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2s.config import ConfigError, to_dict
from d2s.shards import atomic_write_json, atomic_write_text, split_shards, split_size, split_sparse_count
from vse.checkpoint import load_checkpoint, load_processor, load_tokenizer, save_checkpoint
from vse.models import VSEModel, create_model, get_model_config, l2norm, processor_source, tokenizer_source
from vse.transforms import ImageTransform, TextTokenizer

from .config import DataConfig, OptimConfig, TrainConfig, TrainSpec
from .data import Collate, ShardStream, TextField, check_split_usable, iter_eval_batches
from .failpoints import kill_point
from .losses import build_loss
from .recipes import Recipe, get_recipe, with_align_loss, with_warmup
from .schedule import lr_scheduler
from .state import find_state, load_state
from .state import save_state as write_state

log = logging.getLogger(__name__)


# ---- pieces ------------------------------------------------------------------------------


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
        for name in ("dense", "sentence", "sentence_negative"):
            if r.needs(name):
                out[name] = m.embed_texts(
                    batch[f"{name}_ids"], batch[f"{name}_mask"], use_student=False, normalize=False
                )
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
            value = loss(*(embs[e] for e in spec.inputs[:2]), ids, step, *(embs[e] for e in spec.inputs[2:]))
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
    for name in ("sentence", "sentence_negative"):
        if recipe.needs(name):  # not augmented: dropping a word could remove the edited one
            fields[name] = TextField(name, t.dense_max_length, augment=False)
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


# ---- the loop: a Trainer (what one run holds) and the parts that build and drive it ----------------


@dataclass
class Plan:
    """The run's size: the training split, its epoch in steps, the steps to run, validation spacing."""

    urls: list[str]
    n_train: int
    epoch_size: int
    steps_per_epoch: int
    total_steps: int
    val_every: int | None


@dataclass
class Trainer:
    """What one run holds; :func:`train`'s parts fill it in order and the loop reads it."""

    cfg: TrainConfig
    out: Path
    recipe: Recipe
    accelerator: Any
    assets: str | None = None
    model: VSEModel | None = None
    hf_tokenizer: Any = None
    processor: Any = None
    teacher: nn.Module | None = None
    teacher_sha: str | None = None
    teacher_cache: TeacherCache | None = None
    plan: Plan | None = None
    tokenizer: TextTokenizer | None = None
    transform: ImageTransform | None = None
    objective: Any = None  # Objective, wrapped by accelerate
    optimizer: Any = None
    scheduler: Any = None
    progress: Progress = field(default_factory=Progress)
    val_urls: list[str] | None = None
    loader: Any = None
    history: History | None = None
    skipped_here: int = 0  # this process's skipped samples not yet added to progress.skipped_samples
    running: dict[str, float] = field(default_factory=dict)  # loss sums since the last record
    first_loss: float | None = None
    last_loss: float | None = None
    t0: float = 0.0  # when this process's loop started, and the data position / step then
    seen0: int = 0
    step0: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> VSEModel:
        return self.accelerator.unwrap_model(self.objective).model


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict. Works under ``accelerate launch``."""
    t = setup(cfg)
    build_model(t)
    build_teacher(t)
    plan_data(t)
    build_optimizer(t)
    restore_or_record(t)
    t.val_urls = find_val_urls(t)
    t.loader = build_loader(t)
    return run_loop(t)


def resolve_recipe(cfg: TrainSpec) -> Recipe:
    """The recipe with the config's alignment-loss and warm-up overrides applied."""
    recipe = get_recipe(cfg.recipe)
    if cfg.align_loss is not None:
        recipe = with_align_loss(recipe, cfg.align_loss.kind, cfg.align_loss.params)
    if cfg.warmup_epochs is not None:
        recipe = with_warmup(recipe, cfg.warmup_epochs)
    return recipe


def setup(cfg: TrainConfig) -> Trainer:
    """Threads, the recipe, the Accelerator (devices, precision, accumulation, tracker), the seed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).resolve()
    recipe = resolve_recipe(cfg)
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
    return Trainer(cfg=cfg, out=out, recipe=recipe, accelerator=accelerator, assets=cfg.assets)


def build_model(t: Trainer) -> None:
    """Model, HF tokenizer and image processor: from the init checkpoint, or created from the
    model config (building the tiny configs' assets in ``<out>/assets`` when needed)."""
    cfg, recipe = t.cfg, t.recipe
    if recipe.init == "checkpoint":
        if not cfg.init:
            raise ConfigError(f"init: recipe {recipe.name!r} initialises from a checkpoint; pass init=<checkpoint dir>")
        t.model, init_doc = load_checkpoint(cfg.init, student_head=recipe.student_head)
        if init_doc["model"].get("name") != cfg.model:
            log.info(
                "model: using the init checkpoint's config %r (asked for %r)", init_doc["model"].get("name"), cfg.model
            )
        t.hf_tokenizer = load_tokenizer(cfg.init)
        t.processor = load_processor(cfg.init)
        return
    if t.assets is None and _needs_assets(cfg.model, cfg.model_overrides):
        t.assets = str(t.out / "assets")
        from vse.assets import build_assets, have_assets

        if t.main and not have_assets(t.assets, cfg.model):
            build_assets(cfg.shards, t.assets, [cfg.model])
        t.accelerator.wait_for_everyone()
    t.model = create_model(cfg.model, assets_dir=t.assets, student_head=recipe.student_head, **cfg.model_overrides)
    from transformers import AutoImageProcessor, AutoTokenizer

    t.hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(t.model.cfg, t.assets))
    psrc = processor_source(t.model.cfg, t.assets)
    t.processor = AutoImageProcessor.from_pretrained(psrc) if psrc else None


def build_teacher(t: Trainer) -> None:
    """The frozen teacher text encoder the recipe names (a copy of the init's, or a checkpoint's),
    its embedding cache when it is deterministic; then freeze the recipe's frozen groups."""
    cfg, recipe = t.cfg, t.recipe
    if recipe.teacher != "none":
        src = cfg.init if recipe.teacher == "init" else cfg.teacher
        if not src:
            raise ConfigError(
                f"teacher: recipe {recipe.name!r} needs a teacher checkpoint; pass teacher=<checkpoint dir>"
            )
        teacher = (
            copy.deepcopy(t.model.text)
            if recipe.teacher == "init"
            else load_checkpoint(src, student_head=False)[0].text
        )
        t.teacher = freeze_teacher(teacher, recipe.teacher_mode).to(t.accelerator.device)
        t.teacher_sha = state_fingerprint(t.teacher)
    t.teacher_cache = TeacherCache(t.teacher) if t.teacher is not None and recipe.deterministic_teacher else None
    for group, params in t.model.param_groups().items():
        if group in recipe.freeze:
            for _, p in params:
                p.requires_grad_(False)


def plan_data(t: Trainer) -> None:
    """The training split, the step counts, and the tokenizer and image transform."""
    cfg, recipe, acc = t.cfg, t.recipe, t.accelerator
    urls = split_shards(cfg.shards, cfg.data.train_split)
    check_split_usable(urls, recipe.needs_dense, recipe.name)
    n_train = split_size(cfg.shards, cfg.data.train_split)
    epoch_size = n_train if recipe.epoch_unit == "images" else split_sparse_count(cfg.shards, cfg.data.train_split)
    global_batch = cfg.data.batch_size * acc.num_processes * cfg.grad_accum
    steps_per_epoch = max(1, epoch_size // global_batch)
    total_steps = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    val_every = (
        cfg.val_every if cfg.val_every_epochs is None else max(1, int(round(cfg.val_every_epochs * steps_per_epoch)))
    )
    t.plan = Plan(urls, n_train, epoch_size, steps_per_epoch, total_steps, val_every)
    t.tokenizer = TextTokenizer(t.hf_tokenizer)
    icfg = t.model.cfg.image
    t.transform = ImageTransform.from_processor(
        icfg.image_size, t.processor, icfg.mean, icfg.std, random_crop=icfg.random_crop, hflip=icfg.hflip
    )


def optimizer_groups(t: Trainer, objective: Objective) -> list[dict[str, Any]]:
    """AdamW parameter groups: each model group's trainable parameters at lr x its multiplier
    (the config's, else the recipe's), plus learnable loss parameters without weight decay."""
    cfg = t.cfg
    groups = []
    for group, params in t.model.param_groups().items():
        trainable = [p for _, p in params if p.requires_grad]
        if trainable:
            mult = cfg.lr_mult.get(group, t.recipe.lr_mult.get(group, 1.0))
            groups.append({"params": trainable, "lr": cfg.optim.lr * mult, "name": group})
    loss_params = [p for p in objective.losses.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "loss"})
    return groups


def build_optimizer(t: Trainer) -> None:
    """The objective (model + loss terms), AdamW, the lr schedule; prepared by accelerate."""
    cfg, plan = t.cfg, t.plan
    objective = Objective(t.model, t.recipe, plan.steps_per_epoch, ragged=cfg.data.on_bad_sample == "skip")
    optimizer = torch.optim.AdamW(
        optimizer_groups(t, objective),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
    )
    t.scheduler = lr_scheduler(optimizer, cfg.optim, plan.steps_per_epoch, plan.total_steps)
    t.objective, t.optimizer = t.accelerator.prepare(objective, optimizer)


def run_doc(t: Trainer) -> dict[str, Any]:
    """``run_config.json``: the resolved config, recipe, model config and the run's sizes."""
    return {
        "train": to_dict(t.cfg),
        "recipe": to_dict(t.recipe),
        "model": t.model.cfg.to_dict(),
        "assets": t.assets,
        "num_processes": t.accelerator.num_processes,
        "mixed_precision": t.accelerator.mixed_precision,  # as applied: the config's, else the launcher's
        "steps_per_epoch": t.plan.steps_per_epoch,
        "epoch_unit": t.recipe.epoch_unit,
        "epoch_size": t.plan.epoch_size,
        "total_steps": t.plan.total_steps,
        "train_size": t.plan.n_train,
    }


def restore_or_record(t: Trainer) -> None:
    """Resume from the newest state in ``<out>/state`` (``resume``), else write run_config.json;
    then start the tracker."""
    doc = run_doc(t)
    resume_from = find_state(t.out / "state") if t.cfg.resume else None
    if resume_from is not None:
        state = load_state(
            resume_from,
            accelerator=t.accelerator,
            model=t.accelerator.unwrap_model(t.objective),
            optimizer=t.optimizer,
            scheduler=t.scheduler,
        )
        t.progress.load_state_dict(state)
        log.info("resumed from %s at step %d (batch %d)", resume_from, t.progress.step, t.progress.batches)
    elif t.main:
        atomic_write_json(t.out / "run_config.json", doc)
    if t.cfg.tracker != "none":
        t.accelerator.init_trackers("vse", config=_flat_scalars(doc))


def find_val_urls(t: Trainer) -> list[str] | None:
    """The validation split's shards; None (validation off) when there is none or it is not wanted."""
    if t.plan.val_every == 0:
        return None
    try:
        import d2s.retrieval  # noqa: F401

        return split_shards(t.cfg.shards, t.cfg.data.val_split)
    except KeyError:
        log.warning(
            "no %r split in %s: no validation, the last checkpoint is the result", t.cfg.data.val_split, t.cfg.shards
        )
    except ImportError:
        log.warning("d2s.retrieval is not installed: no validation, the last checkpoint is the result")
    return None


def build_loader(t: Trainer) -> torch.utils.data.DataLoader:
    """The endless shard stream of this process, from the run's data position, in a DataLoader."""
    cfg, recipe, acc = t.cfg, t.recipe, t.accelerator
    collate = Collate(
        t.transform,
        t.tokenizer,
        text_fields(recipe, t.model),
        t.model.cfg.text.token_aug,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    stream = ShardStream(
        t.plan.urls,
        batch_size=cfg.data.batch_size,
        collate=collate,
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        shuffle_buffer=cfg.data.shuffle_buffer,
        need_sparse=recipe.needs("sparse"),
        need_dense=recipe.needs_dense,
        start_batch=t.progress.batches,
        caption_sampling=cfg.data.caption_sampling,
    )
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG (restored on resume) untouched
    )


def run_loop(t: Trainer) -> dict[str, Any]:
    """Optimizer steps until ``total_steps``, with records, validations and states between; then finish."""
    from tqdm import tqdm

    t.objective.train()
    t.history = History(t.out / "metrics.jsonl", t.progress.step, t.main)
    t.t0, t.seen0, t.step0 = time.time(), t.progress.batches, t.progress.step
    total = t.plan.total_steps
    bar = tqdm(total=total, initial=t.progress.step, desc=f"vse {t.recipe.name}", disable=not t.main, unit="step")
    it = iter(t.loader)
    while t.progress.step < total:
        if not train_step(t, next(it)):
            continue  # gradient accumulation: no optimizer step yet
        bar.update(1)
        after_step(t, bar)
    bar.close()
    return finish(t, time.time() - t.t0)


def teacher_embeddings(t: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if t.teacher_cache is not None:
        return t.teacher_cache(batch["teacher_ids"], batch["teacher_mask"])
    if t.teacher is None:
        return None
    with torch.no_grad(), t.accelerator.autocast():
        return t.teacher(batch["teacher_ids"], batch["teacher_mask"], normalize=False).float()


def train_step(t: Trainer, batch: dict[str, torch.Tensor]) -> bool:
    """One micro-batch: forward, backward, (clip,) optimizer step under accumulation. True when
    the gradients were synchronised, i.e. an optimizer step was completed."""
    acc, progress = t.accelerator, t.progress
    progress.batches += 1
    t.skipped_here += int(batch.pop("skipped", torch.zeros(())).sum())
    batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
    batch["pixels"] = t.transform.normalize(batch["pixels"])  # uint8 from the loader
    teacher_dense = teacher_embeddings(t, batch)
    with acc.accumulate(t.objective):
        with acc.autocast():
            loss, parts = t.objective(batch, progress.step, teacher_dense)
        acc.backward(loss)
        if acc.sync_gradients and t.cfg.optim.grad_clip > 0:
            clip_gradients(acc, t.objective.parameters(), t.cfg.optim)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    for k, v in parts.items():
        t.running[k] = t.running.get(k, 0.0) + float(v)
    t.running["total"] = t.running.get("total", 0.0) + float(loss.detach())
    t.running["n"] = t.running.get("n", 0) + 1
    if not acc.sync_gradients:
        return False
    t.scheduler.step()
    progress.step += 1
    return True


def after_step(t: Trainer, bar) -> None:
    """What follows an optimizer step: the loss record, a validation, a resumable state (each
    every so many steps; the last step's are the run's end), the test failpoint ``step``."""
    cfg, step, total = t.cfg, t.progress.step, t.plan.total_steps
    if step % cfg.log_every == 0 or step == total:
        record(t, bar)
    if t.plan.val_every and step % t.plan.val_every == 0 and step < total:
        validate(t)
    if step % cfg.save_every == 0 and step < total:
        save_state(t)
    kill_point("step", step)


def samples_per_s(t: Trainer, seconds: float) -> float:
    """Training samples per second over all processes since this process's loop started."""
    return (t.progress.batches - t.seen0) * t.cfg.data.batch_size * t.accelerator.num_processes / max(1e-9, seconds)


def record(t: Trainer, bar) -> None:
    """Mean losses since the last record, lr and throughput: to the tracker, metrics.jsonl,
    the progress bar and the log (one line, so a run's log shows progress between states)."""
    n = t.running.pop("n")
    means = {f"loss/{k}": v / n for k, v in t.running.items()}
    t.running = {}
    means["lr"] = t.scheduler.get_last_lr()[0]
    means["samples_per_s"] = samples_per_s(t, time.time() - t.t0)
    if t.cfg.data.on_bad_sample == "skip":
        sync_skipped(t)
        means["data/skipped_samples"] = t.progress.skipped_samples
    step = t.progress.step
    t.accelerator.log(means, step=step)
    t.history.write(step, means)
    bar.set_postfix(loss=f"{means['loss/total']:.3f}")
    t.last_loss = means["loss/total"]
    if t.first_loss is None:
        t.first_loss = t.last_loss
    if t.main:
        log.info(
            "step %d/%d loss %.4f lr %.3g %.1f samples/s",
            step,
            t.plan.total_steps,
            means["loss/total"],
            means["lr"],
            means["samples_per_s"],
        )


def sync_skipped(t: Trainer) -> None:
    """Add every process's newly skipped samples to ``progress.skipped_samples``."""
    n = torch.tensor([t.skipped_here], device=t.accelerator.device, dtype=torch.long)
    if t.accelerator.num_processes > 1:
        n = t.accelerator.reduce(n, reduction="sum")
    t.progress.skipped_samples += int(n.item())
    t.skipped_here = 0


def save_model(t: Trainer, path: Path, metrics: dict | None = None) -> None:
    """A model checkpoint (``vse.checkpoint`` layout) of the current weights."""
    extra = {"recipe": to_dict(t.recipe), "train": to_dict(t.cfg)}
    save_checkpoint(
        path,
        t.unwrapped,
        tokenizer=t.hf_tokenizer,
        processor=t.processor,
        extra={**extra, "step": t.progress.step, "metrics": metrics or {}},
    )


def save_state(t: Trainer) -> None:
    """A resumable state in ``<out>/state`` (``vse_train.state``)."""
    sync_skipped(t)
    write_state(
        t.out / "state",
        t.progress.step,
        accelerator=t.accelerator,
        model=t.accelerator.unwrap_model(t.objective),
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        progress=t.progress.state_dict(),
    )


def validate(t: Trainer) -> dict | None:
    """Retrieval metrics on the validation split (main process); a new best rSum saves ``best/``."""
    metrics = None
    progress = t.progress
    if t.val_urls is not None and t.main:
        metrics = evaluate(t.unwrapped, t.val_urls, t.tokenizer, t.transform, t.cfg.data, t.accelerator.device)
        t.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress.step)
        t.history.write(progress.step, {f"val/{k}": v for k, v in metrics.items()})
        log.info(
            "step %d val rsum %.2f (i2t R@1 %.1f, t2i R@1 %.1f)",
            progress.step,
            metrics["rsum"],
            metrics["i2t_r1"],
            metrics["t2i_r1"],
        )
        if metrics["rsum"] > progress.best_rsum:
            progress.best_rsum, progress.best_step = metrics["rsum"], progress.step
            save_model(t, t.out / "best", metrics)
    t.accelerator.wait_for_everyone()
    return metrics


def finish(t: Trainer, elapsed: float) -> dict[str, Any]:
    """The last validation, ``last/``, the final state, the bundle (from best, else last), summary.json."""
    metrics = validate(t) if t.progress.step > 0 else None
    if t.main:
        save_model(t, t.out / "last", metrics)
    save_state(t)
    result_dir = t.out / "best" if (t.out / "best").exists() else t.out / "last"
    if t.main:
        from vse.bundle import export_bundle

        export_bundle(result_dir, t.out / "bundle")
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()
    summary = summarize(t, elapsed, metrics, result_dir)
    if t.main:
        atomic_write_json(t.out / "summary.json", summary)
    return summary


def summarize(t: Trainer, elapsed: float, metrics: dict | None, result_dir: Path) -> dict[str, Any]:
    p = t.progress
    return {
        "recipe": t.recipe.name,
        "model": t.model.cfg.name,
        "steps": p.step,
        "steps_this_run": p.step - t.step0,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(samples_per_s(t, elapsed), 1),
        "first_loss": t.first_loss,
        "last_loss": t.last_loss,
        "best_rsum": p.best_rsum if p.best_step >= 0 else None,
        "best_step": p.best_step if p.best_step >= 0 else None,
        "final_metrics": metrics,
        "mixed_precision": t.accelerator.mixed_precision,
        "skipped_samples": p.skipped_samples,
        "teacher_sha": [t.teacher_sha, state_fingerprint(t.teacher)] if t.teacher is not None else None,
        "teacher_cache": {"hits": t.teacher_cache.hits, "misses": t.teacher_cache.misses} if t.teacher_cache else None,
        "checkpoint": str(result_dir),
        "bundle": str(t.out / "bundle"),
    }


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
