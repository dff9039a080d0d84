"""The training loop: one function for every recipe, driven by a typed :class:`TrainConfig`.

:func:`train` builds the run's parts in order (``vse_train.build``, ``vse_train.teacher``),
each complete, into a :class:`Run`; the loop changes only :class:`Loop` (the saved
:class:`~vse_train.state.Counters` and what this process reports). Accelerate handles
devices, mixed precision, gradient accumulation, processes and the tracker; embeddings are
gathered across processes with gradient (``vse_train.distributed``).

Output directory::

    run_config.json   the resolved TrainConfig + recipe + model config (plain JSON)
    assets/           tokenizer + tiny backbones, when the model builds them locally
    state/            resumable states, safetensors + JSON only (vse_train.state: model, optimizer, scheduler, RNG, counters)
    last/             model checkpoint of the last step           (vse.checkpoint layout)
    best/             model checkpoint with the best val rSum       (only when validating)
    bundle/           inference bundle exported from best (or last)
    logs/             TensorBoard
    metrics.jsonl     losses, lr, throughput and validations (vse_train.history)
    summary.json      what train() returns
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2s.atomic import atomic_write_json

from . import build
from .build import Run
from .checkpoints import export_bundles, result_dir, save_model
from .config import TrainConfig
from .failpoints import kill_point
from .history import History, LossMeter
from .objective import clip_gradients
from .state import Counters, save_state
from .teacher import build_teacher
from .validation import find_val_urls, validate

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """What changes while this process trains: the saved counters, the loss sums, the skipped
    samples not yet in the counters; and where the loop started (for the throughput)."""

    counters: Counters
    losses: LossMeter = field(default_factory=LossMeter)
    skipped_here: int = 0
    t0: float = field(default_factory=time.time)
    batches0: int = 0
    step0: int = 0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary dict. Works under ``accelerate launch``.

    The order is fixed: the seed is set first, then the model and loss terms draw their
    initial values, so the same config gives bit-identical weights."""
    return run_loop(*build_run(cfg))


def build_run(cfg: TrainConfig) -> tuple[Run, Loop]:
    """The run's parts, built in order (:func:`train`), and its loop state (restored on resume)."""
    out, recipe = Path(cfg.out).resolve(), build.resolve_recipe(cfg)
    acc = build.make_accelerator(cfg, out)
    parts = build.build_model(cfg, recipe, out, acc)
    teacher = build_teacher(cfg, recipe, parts.model, acc.device)
    build.freeze_groups(parts.model, recipe)
    plan = build.plan_data(cfg, recipe, acc.num_processes)
    opt = build.build_optimization(cfg, recipe, parts.model, plan, acc)
    doc = build.run_doc(cfg, recipe, parts, plan, acc)
    counters = build.restore_or_record(cfg, out, opt, doc, acc)
    val_urls = find_val_urls(cfg, plan.val_every)
    loader = build.build_loader(cfg, recipe, parts, plan, counters.batches, acc)
    history = History(out / "metrics.jsonl", counters.step, acc.is_main_process)
    run = Run(cfg, out, recipe, acc, parts, teacher, plan, opt, val_urls, loader, history)
    return run, Loop(counters, batches0=counters.batches, step0=counters.step)


def run_loop(run: Run, loop: Loop) -> dict[str, Any]:
    """Optimizer steps until ``total_steps``, with records, validations and states between; then finish."""
    from tqdm import tqdm

    run.opt.objective.train()
    total, c = run.plan.total_steps, loop.counters
    bar = tqdm(total=total, initial=c.step, desc=f"vse {run.recipe.name}", disable=not run.main, unit="step")
    it = iter(run.loader)
    while c.step < total:
        if not train_step(run, loop, next(it)):
            continue  # gradient accumulation: no optimizer step yet
        bar.update(1)
        after_step(run, loop, bar)
    bar.close()
    return finish(run, loop, time.time() - loop.t0)


def train_step(run: Run, loop: Loop, batch: dict[str, torch.Tensor]) -> bool:
    """One micro-batch: forward, backward, (clip,) optimizer step under accumulation. True when
    the gradients were synchronised, i.e. an optimizer step was completed."""
    acc, c, opt = run.accelerator, loop.counters, run.opt
    c.batches += 1
    loop.skipped_here += int(batch.pop("skipped", torch.zeros(())).sum())
    batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
    batch["pixels"] = run.parts.transform.normalize(batch["pixels"])  # uint8 from the loader
    teacher_dense = run.teacher.embed(batch, acc) if run.teacher is not None else None
    with acc.accumulate(opt.objective):
        with acc.autocast():
            loss, parts = opt.objective(batch, c.step, teacher_dense)
        objective = acc.unwrap_model(opt.objective)
        if objective.image_thread is not None:
            objective.image_thread.backward(loss, objective.last_embeddings, list(objective.losses.parameters()))
            objective.last_embeddings = {}  # no graph kept past its backward
        else:
            acc.backward(loss)
        if acc.sync_gradients and run.cfg.optim.grad_clip > 0:
            clip_gradients(acc, opt.objective.parameters(), run.cfg.optim)
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
    loop.losses.add(parts, loss)
    if not acc.sync_gradients:
        return False
    opt.scheduler.step()
    c.step += 1
    return True


def after_step(run: Run, loop: Loop, bar) -> None:
    """What follows an optimizer step: the loss record, a validation, a resumable state (each
    every so many steps; the last step's are the run's end), the test failpoint ``step``."""
    cfg, step, total = run.cfg, loop.counters.step, run.plan.total_steps
    if step % cfg.log_every == 0 or step == total:
        record(run, loop, bar)
    if run.plan.val_every and step % run.plan.val_every == 0 and step < total:
        validate(run, loop.counters)
    if step % cfg.save_every == 0 and step < total:
        save_state_now(run, loop)
    kill_point("step", step)


def samples_per_s(run: Run, loop: Loop, seconds: float) -> float:
    """Training samples per second over all processes since this process's loop started."""
    batches = loop.counters.batches - loop.batches0
    return batches * run.cfg.data.batch_size * run.accelerator.num_processes / max(1e-9, seconds)


def record(run: Run, loop: Loop, bar) -> None:
    """Mean losses since the last record, lr and throughput: to the tracker, metrics.jsonl,
    the progress bar and the log (one line, so a run's log shows how far it is between states)."""
    means = loop.losses.means()
    means["lr"] = run.opt.scheduler.get_last_lr()[0]
    means["samples_per_s"] = samples_per_s(run, loop, time.time() - loop.t0)
    if run.cfg.data.on_bad_sample == "skip":
        sync_skipped(run, loop)
        means["data/skipped_samples"] = loop.counters.skipped_samples
    step = loop.counters.step
    run.accelerator.log(means, step=step)
    run.history.write(step, means)
    bar.set_postfix(loss=f"{means['loss/total']:.3f}")
    if run.main:
        log.info(
            "step %d/%d loss %.4f lr %.3g %.1f samples/s",
            step,
            run.plan.total_steps,
            means["loss/total"],
            means["lr"],
            means["samples_per_s"],
        )


def sync_skipped(run: Run, loop: Loop) -> None:
    """Add every process's newly skipped samples to ``counters.skipped_samples``."""
    n = torch.tensor([loop.skipped_here], device=run.accelerator.device, dtype=torch.long)
    if run.accelerator.num_processes > 1:
        n = run.accelerator.reduce(n, reduction="sum")
    loop.counters.skipped_samples += int(n.item())
    loop.skipped_here = 0


def save_state_now(run: Run, loop: Loop) -> None:
    """A resumable state in ``<out>/state`` (``vse_train.state``)."""
    sync_skipped(run, loop)
    acc, opt = run.accelerator, run.opt
    model = acc.unwrap_model(opt.objective)
    save_state(
        run.out / "state",
        loop.counters.step,
        accelerator=acc,
        model=model,
        optimizer=opt.optimizer,
        scheduler=opt.scheduler,
        counters=loop.counters,
    )


def finish(run: Run, loop: Loop, elapsed: float) -> dict[str, Any]:
    """The last validation, ``last/``, the final state, the bundles (each from its best, else
    last), summary.json."""
    metrics = validate(run, loop.counters) if loop.counters.step > 0 else None
    if run.main:
        save_model(run, run.out / "last", loop.counters.step, metrics)
    save_state_now(run, loop)
    if run.main:
        export_bundles(run, loop.counters.step)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    image_thread = run.accelerator.unwrap_model(run.opt.objective).image_thread
    if image_thread is not None:
        image_thread.close()
    summary = summarize(run, loop, elapsed, metrics, result_dir(run.out))
    if run.main:
        atomic_write_json(run.out / "summary.json", summary)
    return summary


def summarize(run: Run, loop: Loop, elapsed: float, metrics: dict | None, result_dir: Path) -> dict[str, Any]:
    c, best = loop.counters, loop.counters.best_step >= 0
    teacher = run.teacher.summary() if run.teacher is not None else {"teacher_sha": None, "teacher_cache": None}
    return {
        "recipe": run.recipe.name,
        "model": run.parts.model.cfg.name,
        "steps": c.step,
        "steps_this_run": c.step - loop.step0,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(samples_per_s(run, loop, elapsed), 1),
        "first_loss": loop.losses.first,
        "last_loss": loop.losses.last,
        "best_rsum": c.best_rsum if best else None,
        "best_step": c.best_step if best else None,
        "final_metrics": metrics,
        "mixed_precision": run.accelerator.mixed_precision,
        "skipped_samples": c.skipped_samples,
        **teacher,
        "checkpoint": str(result_dir),
        "bundle": str(run.out / "bundle"),
        "compositions": {
            comp: {
                "best_rsum": getattr(c, f"best_rsum_{comp}") if getattr(c, f"best_step_{comp}") >= 0 else None,
                "best_step": getattr(c, f"best_step_{comp}") if getattr(c, f"best_step_{comp}") >= 0 else None,
                "bundle": str(run.out / f"bundle-{comp}"),
            }
            for comp in run.cfg.compositions
        },
    }
