"""Retrieval metrics of the model being trained, on the validation split (checkpoint choice)."""

from __future__ import annotations

import logging

import torch

from d2s.retrieval import retrieval_metrics
from d2s.shards import split_shards
from vse.models import VSEModel
from vse.transforms import ImageTransform, TextTokenizer

from .config import DataConfig, TrainConfig
from .data import iter_eval_batches

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
