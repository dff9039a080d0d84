"""Recipes: what a training run optimises, as data (JSON files in ``vse_train/configs/recipes/``).

A recipe says which parameter groups train or stay frozen, where weights come from
(``init``: ``none`` = the model config's backbones, ``checkpoint`` = the run's ``init``
checkpoint), whether a frozen teacher text encoder is kept (``teacher``: ``none``,
``init`` = a frozen copy of the init checkpoint's text encoder, ``teacher`` = the one in the
run's ``teacher`` checkpoint), the learning-rate multipliers per group, and the loss terms.

Each loss term names two *embeddings* the step computes on demand:

    image          images through the image encoder
    sparse         one sparse caption per image (through the student head when the recipe has one)
    dense          the image's dense text through the trained text encoder (no student head)
    teacher_dense  the dense text through the frozen teacher (no gradient)
    sentence       one sentence of the image's dense text (trained text encoder, no student head)
    sentence_negative  that sentence with one word changed (``vse_train.text_edits``)

An alignment term may name a third embedding: extra negatives for the second one, e.g.
``["image", "sentence", "sentence_negative"]`` (each image also has to rank its sentence above
every edited sentence of the batch); only losses with ``hard_negatives = True`` take one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2s.config import ConfigError, from_dict, load_yaml
from d2s.registry import Registry
from vse.models import GROUPS

from .losses import LOSSES

EMBEDDINGS = ("image", "sparse", "dense", "teacher_dense", "sentence", "sentence_negative")


@dataclass
class LossSpec:
    kind: str
    inputs: list[str]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    # The term's weight ramps linearly from 0 to ``weight`` over this many epochs (the reference
    # multiplies its alignment loss by i / n_batch during the first epoch); 0: no ramp.
    ramp_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.ramp_epochs < 0:
            raise ValueError("ramp_epochs must be >= 0")
        if self.kind not in LOSSES:
            raise ValueError(f"kind: unknown loss {self.kind!r}; known: {sorted(LOSSES)}")
        if len(self.inputs) not in (2, 3) or any(e not in EMBEDDINGS for e in self.inputs):
            raise ValueError(f"inputs: need two (or three) of {list(EMBEDDINGS)}, got {self.inputs}")
        if len(self.inputs) == 3 and not getattr(LOSSES[self.kind], "hard_negatives", False):
            raise ValueError(f"inputs: loss {self.kind!r} takes no third input (extra negatives)")


@dataclass
class Recipe:
    losses: list[LossSpec]
    name: str = "custom"
    description: str = ""
    student_head: bool = False
    init: Literal["none", "checkpoint"] = "none"
    teacher: Literal["none", "init", "teacher"] = "none"
    freeze: list[str] = field(default_factory=list)
    lr_mult: dict[str, float] = field(default_factory=dict)
    # What an epoch iterates: "images" (one dense text each: stage 1), or "captions" (every sparse
    # caption once: the reference's epoch for sparse alignment, 5 passes over COCO's images).
    epoch_unit: Literal["images", "captions"] = "images"
    # The frozen teacher as the reference runs it: in train mode (dropout on; BatchNorm on batch
    # statistics, its running statistics left untouched) on the augmented dense text. "eval" and
    # teacher_augment false give a deterministic teacher whose embeddings are cached per text.
    teacher_mode: Literal["train", "eval"] = "train"
    teacher_augment: bool = True

    def __post_init__(self) -> None:
        if not self.losses:
            raise ValueError("losses: a recipe needs at least one loss term")
        for g in list(self.freeze) + list(self.lr_mult):
            if g not in GROUPS:
                raise ValueError(f"freeze/lr_mult: unknown parameter group {g!r}; groups: {list(GROUPS)}")
        if self.needs("teacher_dense") and self.teacher == "none":
            raise ValueError("teacher: a loss uses 'teacher_dense' but the recipe has teacher 'none'")
        if self.teacher == "init" and self.init != "checkpoint":
            raise ValueError("teacher: 'init' needs init 'checkpoint'")

    def needs(self, embedding: str) -> bool:
        return any(embedding in spec.inputs for spec in self.losses)

    @property
    def needs_dense(self) -> bool:
        return any(self.needs(e) for e in ("dense", "teacher_dense", "sentence", "sentence_negative"))

    @property
    def deterministic_teacher(self) -> bool:
        return self.teacher_mode == "eval" and not self.teacher_augment


def with_align_loss(recipe: Recipe, kind: str, params: dict[str, Any]) -> Recipe:
    """The recipe with every alignment term (image<->text) replaced by ``kind`` (weights kept).

    The paper's triplet loss suits pretrained backbones; randomly initialised CPU models
    collapse under hardest negatives (see docs/experiments.md), so their runs use InfoNCE.
    """
    if kind not in LOSSES or LOSSES[kind].arity != "align":
        raise ConfigError(
            f"align_loss.kind: {kind!r} is not an alignment loss; known: "
            f"{sorted(k for k, v in LOSSES.items() if v.arity == 'align')}"
        )
    losses = [
        dataclasses.replace(spec, kind=kind, params=dict(params)) if LOSSES[spec.kind].arity == "align" else spec
        for spec in recipe.losses
    ]
    return dataclasses.replace(recipe, losses=losses)


def with_warmup(recipe: Recipe, epochs: float) -> Recipe:
    """The recipe with the reference's warm-up set to ``epochs``: every triplet term's switch to
    hardest negatives, and the ramp of every alignment term that has one."""
    losses = []
    for spec in recipe.losses:
        if LOSSES[spec.kind].arity == "align":
            params = {**spec.params, "warmup_epochs": epochs} if spec.kind == "triplet" else spec.params
            spec = dataclasses.replace(spec, params=params, ramp_epochs=epochs if spec.ramp_epochs > 0 else 0.0)
        losses.append(spec)
    return dataclasses.replace(recipe, losses=losses)


# The recipes: JSON files in vse_train/configs/recipes, in folders named by $VSE_RECIPE_PATH,
# or advertised by a package through the entry-point group vse.recipes.
RECIPES: Registry[dict] = Registry(
    "recipe", "vse.recipes", name_attr=None, json_package=("vse_train", "configs/recipes"), json_env="VSE_RECIPE_PATH"
)


def list_recipes() -> list[str]:
    return RECIPES.names()


def get_recipe(name_or_path: str | Path | dict) -> Recipe:
    """A registered recipe by name, a JSON/YAML file, or a dict; errors name the field."""
    if isinstance(name_or_path, dict):
        return from_dict(Recipe, name_or_path, "recipe")
    p = Path(str(name_or_path))
    if p.suffix in (".json", ".yaml", ".yml") and p.exists():
        doc = json.loads(p.read_text()) if p.suffix == ".json" else load_yaml(p)
        doc.setdefault("name", p.stem)
        return from_dict(Recipe, doc, f"recipe {p}")
    try:
        doc = copy.deepcopy(RECIPES.get(str(name_or_path)))  # the registry caches the parsed file
    except ConfigError as exc:
        raise ConfigError(f"recipe: {exc}") from None
    doc["name"] = str(name_or_path)
    return from_dict(Recipe, doc, f"recipe {name_or_path!r}")
