"""What a training step optimises: the model's embeddings the recipe names, gathered over
processes, fed to the recipe's loss terms (:class:`Objective`); the text fields the loader
tokenizes for them (:func:`text_fields`); gradient clipping.
"""

from __future__ import annotations

import torch
from torch import nn

from vse.models import VSEModel, l2norm

from .config import OptimConfig
from .data import TextField
from .distributed import gather_no_grad, gather_with_grad, gathered_sizes
from .image_thread import ImageThread
from .losses import build_loss
from .recipes import Recipe


def ramp_factor(step: int, ramp_steps: float) -> float:
    """Weight multiplier at optimizer step ``step`` (0-based): step / ramp_steps, then 1."""
    return min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0


class Objective(nn.Module):
    """The model plus the recipe's loss terms; ``forward(batch, step)`` -> (total, {term: value}).

    It is what DDP wraps, so learnable loss parameters (an InfoNCE temperature) are synchronised too.
    """

    def __init__(
        self,
        model: VSEModel,
        recipe: Recipe,
        steps_per_epoch: int,
        ragged: bool = False,
        image_thread: ImageThread | None = None,
    ):
        super().__init__()
        self.ragged = ragged  # batches may differ in size between processes (skipped bad samples)
        self.image_thread = image_thread  # the image encoder next to the text encoders (vse_train.image_thread)
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
        image = None
        if r.needs("image"):
            image = self.image_thread.forward(m.image, batch["pixels"]) if self.image_thread is not None else None
            if image is None:
                out["image"] = m.embed_images(batch["pixels"])
        if r.needs("sparse"):
            out["sparse"] = m.embed_texts(batch["sparse_ids"], batch["sparse_mask"], use_student=True, normalize=False)
        for name in ("dense", "sentence", "sentence_negative"):
            if r.needs(name):
                out[name] = m.embed_texts(
                    batch[f"{name}_ids"], batch[f"{name}_mask"], use_student=False, normalize=False
                )
        return out if image is None else {"image": image.result(), **out}

    def forward(self, batch: dict[str, torch.Tensor], step: int, teacher_dense: torch.Tensor | None = None):
        sizes = gathered_sizes(batch["image_ids"]) if self.ragged else None
        raw = {k: gather_with_grad(v, sizes) for k, v in self.embeddings(batch).items()}
        self.last_embeddings = dict(raw)  # what the loss reaches the encoders through (vse_train.image_thread)
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


def text_fields(recipe: Recipe, model: VSEModel) -> dict[str, TextField]:
    """The texts the loader tokenizes for the recipe's embeddings (``sparse``, ``dense``, ``teacher``,
    ``sentence``, ``sentence_negative``)."""
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


def clip_gradients(accelerator, params, cfg: OptimConfig) -> None:
    """Clip to ``cfg.grad_clip``. With ``clip_scaled_grads`` and an fp16 loss scaler, clip the
    gradients as they are (still scaled), as the reference does; otherwise unscale first."""
    if cfg.clip_scaled_grads and getattr(accelerator, "scaler", None) is not None:
        torch.nn.utils.clip_grad_norm_(list(params), cfg.grad_clip)
    else:
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
