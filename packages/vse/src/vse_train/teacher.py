"""The frozen teacher of distillation recipes: built, frozen, fingerprinted, and (when it is
deterministic) cached per dense text.

The recipe names it (``teacher``): ``init`` is a copy of the init checkpoint's text encoder
taken before training starts, ``teacher`` the text encoder of the run's ``teacher``
checkpoint. It never gets gradients and its state never changes: :func:`state_fingerprint`
before and after a run (``summary.json``'s ``teacher_sha``) shows it.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from d2s.config import ConfigError
from vse.checkpoint import load_checkpoint
from vse.models import VSEModel

from .config import TrainConfig
from .recipes import Recipe


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


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


@dataclass(frozen=True)
class Teacher:
    """The frozen teacher text encoder, its fingerprint when frozen, its cache (deterministic
    teachers only: ``teacher_mode: eval`` on unaugmented text)."""

    module: nn.Module
    sha: str
    cache: TeacherCache | None

    def embed(self, batch: dict[str, torch.Tensor], accelerator) -> torch.Tensor:
        """The teacher's embeddings of the batch's dense texts, before their final L2 norm."""
        if self.cache is not None:
            return self.cache(batch["teacher_ids"], batch["teacher_mask"])
        with torch.no_grad(), accelerator.autocast():
            return self.module(batch["teacher_ids"], batch["teacher_mask"], normalize=False).float()

    def summary(self) -> dict:
        """``teacher_sha`` (when frozen, now: equal when untouched) and ``teacher_cache`` of summary.json."""
        cache = {"hits": self.cache.hits, "misses": self.cache.misses} if self.cache is not None else None
        return {"teacher_sha": [self.sha, state_fingerprint(self.module)], "teacher_cache": cache}


def build_teacher(cfg: TrainConfig, recipe: Recipe, model: VSEModel, device) -> Teacher | None:
    """The frozen teacher the recipe names (a copy of the init's text encoder, or a checkpoint's)
    on ``device``, with its cache when it is deterministic; None for recipes without one."""
    if recipe.teacher == "none":
        return None
    src = cfg.init if recipe.teacher == "init" else cfg.teacher
    if not src:
        raise ConfigError(f"teacher: recipe {recipe.name!r} needs a teacher checkpoint; pass teacher=<checkpoint dir>")
    text = copy.deepcopy(model.text) if recipe.teacher == "init" else load_checkpoint(src, student_head=False)[0].text
    module = freeze_teacher(text, recipe.teacher_mode).to(device)
    cache = TeacherCache(module) if recipe.deterministic_teacher else None
    return Teacher(module, state_fingerprint(module), cache)
