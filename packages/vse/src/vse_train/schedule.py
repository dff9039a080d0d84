"""The learning-rate schedule of the trainer and of the backbone pre-training: one function.

:func:`lr_factor` is the multiplier of the base lr at optimizer step ``step`` (0-based):
a linear warm-up ``(step + 1) / warmup_steps`` (all schedules), times

- ``constant``: 1;
- ``step``: ``decay_factor`` to the power of the ``decay_epochs`` reached (the reference's
  x0.3 at epochs 9/15/20/25);
- ``cosine``: from 1 down to ``min_lr_ratio`` over the steps after the warm-up,
  ``min + (1 - min) * (1 + cos(pi * t)) / 2`` with ``t`` from 0 to 1.

:func:`lr_scheduler` wraps it in a ``LambdaLR``; its lambda is code, rebuilt from the config on
resume (``vse_train.state`` stores the scheduler's counters only).
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


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


def lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s lr at each step: its base lr times :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, total_steps))
