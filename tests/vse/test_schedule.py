"""The one learning-rate schedule (vse_train.schedule), as the trainer and the backbone
pre-training use it, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vse_train.backbone_pretrain import _schedule
from vse_train.config import OptimConfig
from vse_train.schedule import lr_scheduler

R2 = math.sqrt(2) / 2  # cos(pi / 4)


def _factors(make, steps: int) -> list[float]:
    """The lr (base lr 1) at steps 0 .. steps - 1 of a LambdaLR made by ``make(optimizer)``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


# (optim settings, steps per epoch, total steps) -> lr factor at steps 0, 1, ...
TRAINER = [
    # cosine after a 2-step warm-up over 6 steps: t = (step - 2) / 4
    (dict(schedule="cosine", warmup_steps=2), 1, 6, [0.5, 1.0, 1.0, 0.5 + R2 / 2, 0.5, 0.5 - R2 / 2, 0.0]),
    # cosine to a floor of 0.1 without warm-up over 4 steps: 0.1 + 0.9 * (1 + cos(pi t)) / 2, t = step / 4
    (
        dict(schedule="cosine", min_lr_ratio=0.1),
        1,
        4,
        [1.0, 0.1 + 0.45 * (1 + R2), 0.55, 0.1 + 0.45 * (1 - R2), 0.1, 0.1],
    ),
    # x0.3 at epochs 1 and 2, 2 steps per epoch
    (dict(schedule="step", decay_epochs=[1.0, 2.0], decay_factor=0.3), 2, 6, [1.0, 1.0, 0.3, 0.3, 0.09, 0.09]),
    # constant after a 4-step warm-up
    (dict(schedule="constant", warmup_steps=4), 1, 6, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]),
    # the step schedule keeps the warm-up too
    (dict(schedule="step", warmup_steps=2, decay_epochs=[1.0], decay_factor=0.5), 2, 4, [0.5, 1.0, 0.5, 0.5]),
]


@pytest.mark.parametrize("optim, steps_per_epoch, total, want", TRAINER)
def test_trainer_schedule_hand_values(optim, steps_per_epoch, total, want):
    cfg = OptimConfig(lr=1.0, **optim)
    got = _factors(lambda opt: lr_scheduler(opt, cfg, steps_per_epoch, total), len(want))
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "steps, warmup, want",
    [
        # 2 warm-up steps, then cosine to 0 over the 4 left: the trainer's first row
        (6, 2, [0.5, 1.0, 1.0, 0.5 + R2 / 2, 0.5, 0.5 - R2 / 2]),
        # no warm-up: cosine from the first step
        (4, 0, [1.0, 0.5 + R2 / 2, 0.5, 0.5 - R2 / 2]),
        # a warm-up longer than the phase is cut to steps - 1 (here 2), so the peak lr is reached
        (3, 10, [0.5, 1.0, 1.0]),
    ],
)
def test_backbone_pretrain_schedule_hand_values(steps, warmup, want):
    got = _factors(lambda opt: _schedule(opt, steps, warmup), len(want))
    assert got == pytest.approx(want, abs=1e-12)
