"""Retrieval metrics of the model being trained, on the validation split (checkpoint choice)."""

from __future__ import annotations

import logging

import torch

from d2s.retrieval import retrieval_metrics
from d2s.shards import split_shards
from vse.models import VSEModel, evaluation_composition
from vse.transforms import ImageTransform, TextTokenizer

from .build import Run
from .checkpoints import save_model
from .config import DataConfig, TrainConfig
from .data import iter_eval_batches
from .state import Counters

log = logging.getLogger(__name__)


def find_val_urls(cfg: TrainConfig, val_every: int | None) -> list[str] | None:
    """The validation split's shards; None (validation off) when there is none or it is not wanted."""
    if val_every == 0:
        return None
    try:
        return split_shards(cfg.shards, cfg.data.val_split)
    except KeyError:
        log.warning(
            "no %r split in %s: no validation, the last checkpoint is the result", cfg.data.val_split, cfg.shards
        )
    return None


@torch.no_grad()
def evaluate(
    model: VSEModel, urls: list[str], tokenizer: TextTokenizer, transform: ImageTransform, data: DataConfig, device
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on an evaluation split (all sparse captions of each image)."""
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


def validate(run: Run, c: Counters) -> dict | None:
    """Retrieval metrics on the validation split (main process): under the model's own
    evaluation composition (a new best rSum saves ``best/``) and under each of
    ``compositions`` (``val_<c>/`` metrics; a new best saves ``best-<c>/``)."""
    metrics = None
    if run.val_urls is not None and run.main:
        metrics = evaluate_and_keep(run, c, None)
        student = run.unwrapped.student
        own = student.cfg.combine_eval if student is not None else None
        for comp in run.cfg.compositions:
            evaluate_and_keep(run, c, comp, metrics if comp == own else None)
    run.accelerator.wait_for_everyone()
    return metrics


def evaluate_and_keep(
    run: Run, c: Counters, composition: str | None, metrics: dict[str, float] | None = None
) -> dict[str, float]:
    """One validation under ``composition`` (None: the model's own; ``metrics``: already
    measured under it); logged, and its checkpoint saved when its rSum beats that
    composition's best so far."""
    parts, acc, model = run.parts, run.accelerator, run.unwrapped
    with evaluation_composition(model, composition):
        if metrics is None:
            metrics = evaluate(model, run.val_urls, parts.tokenizer, parts.transform, run.cfg.data, acc.device)
        prefix, suffix = ("val", "") if composition is None else (f"val_{composition}", f"_{composition}")
        acc.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=c.step)
        run.history.write(c.step, {f"{prefix}/{k}": v for k, v in metrics.items()})
        log.info(
            "step %d %s rsum %.2f (i2t R@1 %.1f, t2i R@1 %.1f)",
            c.step,
            prefix,
            metrics["rsum"],
            metrics["i2t_r1"],
            metrics["t2i_r1"],
        )
        if metrics["rsum"] > getattr(c, f"best_rsum{suffix}"):
            setattr(c, f"best_rsum{suffix}", metrics["rsum"])
            setattr(c, f"best_step{suffix}", c.step)
            save_model(run, run.out / f"best{'-' + composition if composition else ''}", c.step, metrics)
    return metrics
