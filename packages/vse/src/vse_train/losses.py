"""Losses, as pure functions plus small modules behind a registry (recipes name them).

- ``triplet``: VSE++ bidirectional hinge loss, margin 0.2, summed over anchors; hardest
  negative per anchor after ``warmup_epochs`` (before that the hinge SUMMED over all
  negatives, as the reference's ``ContrastiveLoss`` without max-violation; ``mean`` is an
  option); pairs whose image ids are equal are never negatives.
- ``infonce``: symmetric cross-entropy over similarities / temperature (learnable or fixed),
  other captions of the same image masked out (not in the paper; for from-scratch models).
- ``distill``: ``1 - cos`` (default) or ``mse`` between student and teacher embeddings,
  averaged over the batch (the reference: ``1 - mean cos`` and ``nn.MSELoss``, i.e. the mean
  over batch and dimensions, on the unnormalised embeddings).

Alignment losses take L2-normalised embeddings; the distillation loss takes them before the
final L2 norm (cosine does not care; MSE does, and the reference's MSE sees them raw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from d2s.config import ConfigError, from_dict
from d2s.registry import Registry


def negatives_mask(ids_a: torch.Tensor | None, ids_b: torch.Tensor | None, n: int, m: int, device) -> torch.Tensor:
    """True where (row, column) is a valid negative: not the diagonal, not the same image id."""
    if ids_a is None or ids_b is None:
        return ~torch.eye(n, m, dtype=torch.bool, device=device)
    return ids_a[:, None] != ids_b[None, :]


def triplet_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    margin: float = 0.2,
    hardest: bool = True,
    reduction: str = "sum",
) -> torch.Tensor:
    """Hinge loss over the batch's similarity matrix; row i of ``img`` matches row i of ``txt``.

    Per anchor: the hardest negative's hinge (``hardest``), else the hinges over all negatives
    summed (``reduction="sum"``) or averaged (``"mean"``); anchors are always summed."""
    scores = img @ txt.t()
    pos = scores.diagonal()
    neg = negatives_mask(ids, ids, *scores.shape, scores.device)
    cost_txt = (margin + scores - pos[:, None]).clamp(min=0) * neg  # image anchors, caption negatives
    cost_img = (margin + scores - pos[None, :]).clamp(min=0) * neg  # caption anchors, image negatives
    if hardest:
        return cost_txt.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    if reduction == "sum":
        return cost_txt.sum() + cost_img.sum()
    n_row = neg.sum(1).clamp(min=1)
    n_col = neg.sum(0).clamp(min=1)
    return (cost_txt.sum(1) / n_row).sum() + (cost_img.sum(0) / n_col).sum()


def infonce_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    ids: torch.Tensor | None,
    temperature: torch.Tensor | float,
    reduction: str = "mean",
    extra_txt: torch.Tensor | None = None,
):
    """Symmetric InfoNCE; ``extra_txt`` (hard negatives, one per pair) joins the texts each image
    is ranked against (image -> text only, as NegCLIP does)."""
    logits = (img @ txt.t()) / temperature
    n = logits.shape[0]
    same = ~negatives_mask(ids, ids, n, n, logits.device)
    other_pos = same & ~torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(other_pos, float("-inf"))
    labels = torch.arange(n, device=logits.device)
    i2t = logits if extra_txt is None else torch.cat([logits, (img @ extra_txt.t()) / temperature], dim=1)
    return (
        F.cross_entropy(i2t, labels, reduction=reduction) + F.cross_entropy(logits.t(), labels, reduction=reduction)
    ) / 2


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, metric: str = "cos", reduction: str = "mean"):
    """Per pair ``1 - cos`` or the mean squared difference over dimensions; then the batch mean
    (the reference) or sum."""
    teacher = teacher.detach()
    if metric == "cos":
        per = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    elif metric == "mse":
        per = ((student.float() - teacher.float()) ** 2).mean(-1)
    else:
        raise ValueError(f"distill metric {metric!r}; known: cos, mse")
    return per.sum() if reduction == "sum" else per.mean()


# ---- loss modules (what recipes instantiate) ----------------------------------------------


@dataclass
class TripletParams:
    margin: float = 0.2
    max_violation: bool = True
    warmup_epochs: float = 1.0  # all negatives for this many epochs, then the hardest
    warmup_reduction: Literal["sum", "mean"] = "sum"  # over the negatives during the warm-up


@dataclass
class InfoNCEParams:
    temperature: float = 0.07
    learnable: bool = True
    # "sum" matches the paper's convention (triplet and distillation summed over the batch),
    # so that a recipe's 1:1 weights mean the same thing with either alignment loss.
    reduction: Literal["mean", "sum"] = "mean"


@dataclass
class DistillParams:
    metric: Literal["cos", "mse"] = "cos"
    reduction: Literal["sum", "mean"] = "mean"


class TripletLoss(nn.Module):
    Params = TripletParams
    arity = "align"

    def __init__(self, p: TripletParams, steps_per_epoch: int):
        super().__init__()
        self.p = p
        self.warmup_steps = int(round(p.warmup_epochs * steps_per_epoch))

    def forward(self, a, b, ids, step: int):
        hardest = self.p.max_violation and step >= self.warmup_steps
        return triplet_loss(a, b, ids, margin=self.p.margin, hardest=hardest, reduction=self.p.warmup_reduction)


class InfoNCELoss(nn.Module):
    Params = InfoNCEParams
    arity = "align"
    hard_negatives = True  # a third input: extra texts each image is ranked against

    def __init__(self, p: InfoNCEParams, steps_per_epoch: int):
        super().__init__()
        self.p = p
        init = torch.tensor(math.log(1.0 / p.temperature))
        if p.learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def forward(self, a, b, ids, step: int, extra: torch.Tensor | None = None):
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return infonce_loss(a, b, ids, 1.0 / scale, self.p.reduction, extra)


class DistillLoss(nn.Module):
    Params = DistillParams
    arity = "distill"

    def __init__(self, p: DistillParams, steps_per_epoch: int):
        super().__init__()
        self.p = p

    def forward(self, a, b, ids, step: int):
        return distill_loss(a, b, self.p.metric, self.p.reduction)


# Loss kinds a recipe can name; a package adds its own through the entry-point group vse.losses
# (a torch.nn.Module class with a Params dataclass, an ``arity`` of "align" or "distill" and
# ``__init__(params, steps_per_epoch)``).
LOSSES: Registry[type[nn.Module]] = Registry("loss", "vse.losses", base=nn.Module, name_attr=None, items="class")
LOSSES.add("triplet", TripletLoss)
LOSSES.add("infonce", InfoNCELoss)
LOSSES.add("distill", DistillLoss)


def build_loss(kind: str, params: dict[str, Any], steps_per_epoch: int, where: str) -> nn.Module:
    try:
        cls = LOSSES.get(kind)
    except ConfigError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    return cls(from_dict(cls.Params, params, f"{where}.params"), steps_per_epoch)
