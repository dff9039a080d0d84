"""The synthetic world: procedurally drawn scenes whose sparse and dense captions are exact.

Why it looks the way it does (see docs/synthetic-world.md): D2S-VSE assumes that a short
caption is one view of a scene whose other parts are predictable, as in real photos
(a surfboard implies water). So the world has *scene types*. Each type has a
background (colour and texture), a set of signature objects that usually appear, and a
preferred row for each of them. Signature objects are shared between types, as "a man"
and "a table" are shared between real photos, so negatives are locally similar. A
sparse caption names one or two objects (sometimes the scene type); the dense
description names the scene type, the background, every object with its attributes
and position, and the relations between neighbours.

Everything is a pure function of (world_seed, split seed, index): a sample does not
depend on shard size, worker count or generation order, so any shard can be
regenerated identically after an interruption.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .schema import Sample
from .shards import ShardWriter, completed_shards, remove_incomplete, shard_name, write_manifest

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon", "heart", "bar")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 120, 190),
    "cyan": (20, 210, 220),
}
SIZES = ("small", "large")
BACKGROUNDS = {
    "sand": (214, 196, 150),
    "slate": (112, 128, 144),
    "mint": (170, 215, 185),
    "lavender": (190, 180, 220),
    "peach": (240, 190, 160),
    "sky": (160, 200, 235),
    "olive": (150, 150, 90),
    "rose": (215, 160, 170),
}
TEXTURES = ("plain", "striped", "checkered", "dotted", "wavy", "grainy")
SCENE_TYPES = (
    "kitchen",
    "beach",
    "park",
    "street",
    "office",
    "farm",
    "harbor",
    "garden",
    "market",
    "classroom",
    "station",
    "forest",
    "stadium",
    "library",
    "bakery",
    "airport",
)
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a world. ``world_seed`` fixes the scene types; split seeds fix the samples."""

    world_seed: int = 0
    image_size: int = 64
    grid: int = 3
    min_objects: int = 3
    max_objects: int = 6
    num_scene_types: int = 12
    signature_size: int = 6  # signature objects per scene type
    signature_prob: float = 0.85  # chance an object is drawn from the scene's signature
    background_prob: float = 0.85  # chance the background is the scene type's own
    layout_prob: float = 0.75  # chance a signature object sits in its preferred row
    relation_caption_prob: float = 0.15
    scene_caption_prob: float = 0.2
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        checks = [
            (16 <= self.image_size <= 1024, "image_size must be in [16, 1024]"),
            (2 <= self.grid <= 6, "grid must be in [2, 6]"),
            (
                1 <= self.min_objects <= self.max_objects <= self.grid * self.grid,
                "need 1 <= min_objects <= max_objects <= grid*grid",
            ),
            (1 <= self.num_scene_types <= len(SCENE_TYPES), f"num_scene_types must be in [1, {len(SCENE_TYPES)}]"),
            (1 <= self.signature_size <= len(SHAPES) * len(COLORS), "signature_size out of range"),
            (self.captions_per_image >= 1, "captions_per_image must be >= 1"),
        ]
        for name in ("signature_prob", "background_prob", "layout_prob", "relation_caption_prob", "scene_caption_prob"):
            checks.append((0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _split_id(split: str) -> int:
    return SPLIT_IDS.get(split, 1000 + sum(ord(c) * 31**i for i, c in enumerate(split)) % 100000)


@lru_cache(maxsize=16)
def scene_types(cfg: WorldConfig) -> tuple[dict, ...]:
    """The world's scene types: name, background, texture, signature objects with preferred rows."""
    rng = np.random.default_rng([cfg.world_seed, 7919])
    names = list(SCENE_TYPES[: cfg.num_scene_types])
    # A shared pool smaller than types x signature, so signature objects recur across types.
    pool_size = max(cfg.signature_size + 2, (cfg.num_scene_types * cfg.signature_size) // 3)
    all_objs = [(s, c) for s in SHAPES for c in COLORS]
    pool_idx = rng.choice(len(all_objs), size=min(pool_size, len(all_objs)), replace=False)
    pool = [all_objs[i] for i in pool_idx]
    bgs = list(BACKGROUNDS)
    types = []
    for i, name in enumerate(names):
        sig_idx = rng.choice(len(pool), size=cfg.signature_size, replace=False)
        signature = [{"shape": pool[j][0], "color": pool[j][1], "row": int(rng.integers(cfg.grid))} for j in sig_idx]
        types.append(
            {
                "name": name,
                "background": bgs[i % len(bgs)],
                "texture": TEXTURES[(i // len(bgs) + i) % len(TEXTURES)],
                "signature": signature,
            }
        )
    return tuple(types)


def make_scene(cfg: WorldConfig, rng: np.random.Generator) -> dict:
    """Draw one scene description (plain JSON-able data)."""
    types = scene_types(cfg)
    st = types[int(rng.integers(len(types)))]
    if rng.random() < cfg.background_prob:
        bg, tex = st["background"], st["texture"]
    else:
        bg, tex = str(rng.choice(list(BACKGROUNDS))), str(rng.choice(TEXTURES))
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    free = {(r, c) for r in range(cfg.grid) for c in range(cfg.grid)}
    objects = []
    used_sig: set[int] = set()
    for _ in range(n):
        avail_sig = [j for j in range(len(st["signature"])) if j not in used_sig]
        if avail_sig and rng.random() < cfg.signature_prob:
            j = int(rng.choice(avail_sig))
            used_sig.add(j)
            shape, color, pref_row = st["signature"][j]["shape"], st["signature"][j]["color"], st["signature"][j]["row"]
        else:
            shape, color, pref_row = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), None
        cells = sorted(free)
        if pref_row is not None and rng.random() < cfg.layout_prob:
            in_row = [rc for rc in cells if rc[0] == pref_row]
            cells = in_row or cells
        r, c = cells[int(rng.integers(len(cells)))]
        free.discard((r, c))
        objects.append({"shape": shape, "color": color, "size": str(rng.choice(SIZES)), "row": r, "col": c})
    objects.sort(key=lambda o: (o["row"], o["col"]))
    return {"scene_type": st["name"], "background": bg, "texture": tex, "grid": cfg.grid, "objects": objects}


def perturb_scene(scene: dict, rng: np.random.Generator) -> dict:
    """A near-duplicate: the same scene with one object's colour, shape or size changed."""
    out = json.loads(json.dumps(scene))
    obj = out["objects"][int(rng.integers(len(out["objects"])))]
    attr = str(rng.choice(["color", "shape", "size"]))
    choices = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
    obj[attr] = str(rng.choice([v for v in choices if v != obj[attr]]))
    return out


# ---- language -----------------------------------------------------------------------


def position_phrase(obj: dict, grid: int = 3) -> str:
    """'top left', 'middle', 'bottom right' ... (3x3 words; larger grids use row/column numbers)."""
    if grid != 3:
        return f"row {obj['row'] + 1} column {obj['col'] + 1}"
    r, c = ROW_WORDS[obj["row"]], COL_WORDS[obj["col"]]
    if r == "middle" and c == "center":
        return "center"
    if c == "center":
        return r
    if r == "middle":
        return c
    return f"{r} {c}"


def relations(scene: dict) -> list[tuple[int, str, int]]:
    """Exact relations between objects in neighbouring cells: (i, 'above'|'left of', j)."""
    out = []
    objs = scene["objects"]
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if a["col"] == b["col"] and b["row"] == a["row"] + 1:
                out.append((i, "above", j))
            if a["row"] == b["row"] and b["col"] == a["col"] + 1:
                out.append((i, "left of", j))
    return out


def _np(obj: dict, attrs: tuple[str, ...] = ("size", "color")) -> str:
    words = [obj[a] for a in ("size", "color") if a in attrs] + [obj["shape"]]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _header_sentence(scene: dict, scene_type: str, count: int) -> str:
    return f"A {scene_type} scene on a {scene['texture']} {scene['background']} background with {count} objects."


def _object_sentence(obj: dict, grid: int) -> str:
    return f"At the {position_phrase(obj, grid)} there is {_article(_np(obj))}."


def _relation_sentence(a: dict, rel: str, b: dict) -> str:
    return f"The {_np(a)} is {rel} the {_np(b)}."


def describe_sentences(scene: dict) -> list[str]:
    """The sentences of :func:`describe`, in order: the scene sentence (type, background, object
    count), one sentence per object, one per neighbour relation (:func:`relations`)."""
    objs = scene["objects"]
    grid = scene.get("grid", 3)
    out = [_header_sentence(scene, scene["scene_type"], len(objs))]
    out += [_object_sentence(o, grid) for o in objs]
    out += [_relation_sentence(objs[i], rel, objs[j]) for i, rel, j in relations(scene)]
    return out


def describe(scene: dict) -> str:
    """The exact dense description: scene type, background, every object, neighbour relations."""
    return " ".join(describe_sentences(scene))


def sparse_captions(scene: dict, cfg: WorldConfig, rng: np.random.Generator) -> list[str]:
    """COCO-style short captions, each true of the scene and naming only part of it."""
    objs = scene["objects"]
    rels = relations(scene)
    grid = scene.get("grid", 3)
    caps: list[str] = []
    attrs_options = [("color",), ("size", "color"), ("color",), ()]

    def mention(o: dict) -> str:
        return _article(_np(o, attrs_options[int(rng.integers(len(attrs_options)))]))

    attempts = 0
    while len(caps) < cfg.captions_per_image and attempts < 50:
        attempts += 1
        u = rng.random()
        if rels and u < cfg.relation_caption_prob:
            i, rel, j = rels[int(rng.integers(len(rels)))]
            cap = f"{mention(objs[i])} {rel} {mention(objs[j])}"
        elif u < cfg.relation_caption_prob + cfg.scene_caption_prob:
            o = objs[int(rng.integers(len(objs)))]
            cap = f"{_article(scene['scene_type'])} scene with {mention(o)}"
        else:
            k = 1 if (len(objs) == 1 or rng.random() < 0.5) else 2
            picked = rng.choice(len(objs), size=k, replace=False)
            phrases = [mention(objs[int(p)]) for p in picked]
            cap = " and ".join(phrases)
            v = rng.random()
            if k == 1 and v < 0.4:
                cap += f" at the {position_phrase(objs[int(picked[0])], grid)}"
            elif v < 0.6:
                cap += f" on a {scene['texture']} background"
        if cap not in caps:
            caps.append(cap)
    while len(caps) < cfg.captions_per_image:  # tiny scenes may not yield enough distinct captions
        caps.append(caps[len(caps) % max(1, len(caps))])
    return caps


# ---- planted errors ---------------------------------------------------------------------
# Captions with known false sentences, to measure sentence scorers against exact truth
# (docs/synthetic-world.md, "Planted errors").

#: the kinds of false sentence plant_errors makes; a sentence's label is "true" or one of these
ERROR_KINDS = (
    "absent_object",
    "wrong_color",
    "wrong_size",
    "wrong_position",
    "wrong_relation",
    "wrong_scene",
    "wrong_count",
    "filler",
)
#: kinds that add a sentence to the description; every other kind replaces a true sentence
INSERTED_KINDS = ("absent_object", "filler")
#: what a replacement error becomes when no sentence of the caption can take it (first that can,
#: else an inserted absent_object, which always can)
ERROR_FALLBACK = {
    "wrong_scene": ("wrong_count", "wrong_color", "wrong_position", "wrong_size", "wrong_relation"),
    "wrong_count": ("wrong_scene", "wrong_color", "wrong_position", "wrong_size", "wrong_relation"),
    "wrong_color": ("wrong_size", "wrong_position", "wrong_relation", "wrong_scene", "wrong_count"),
    "wrong_size": ("wrong_color", "wrong_position", "wrong_relation", "wrong_scene", "wrong_count"),
    "wrong_position": ("wrong_color", "wrong_size", "wrong_relation", "wrong_scene", "wrong_count"),
    "wrong_relation": ("wrong_position", "wrong_color", "wrong_size", "wrong_scene", "wrong_count"),
}
#: generic sentences true of every image of this world; they say nothing about the scene
FILLER_SENTENCES = (
    "The shapes have clean, flat colours.",
    "The image is a simple flat illustration.",
    "Each object sits in its own cell of an invisible grid.",
    "None of the objects overlap.",
    "The picture is drawn in two dimensions, seen straight on.",
    "There are no people, animals or words in the image.",
    "The edges of the shapes are sharp.",
    "The composition is tidy and evenly spaced.",
)
#: with a world given, the chance that an absent object is one of the scene type's own objects
COOCCURRENCE_PROB = 0.5
# the order of the kinds on the sampling line: kinds that compete for one sentence sit together
_LINE_ORDER = (
    "wrong_scene",
    "wrong_count",
    "wrong_color",
    "wrong_size",
    "wrong_position",
    "wrong_relation",
    "absent_object",
    "filler",
)
_ATTRS = ("size", "color", "shape")


def check_error_params(rate: float, mix: dict[str, float] | None = None) -> dict[str, float]:
    """Validate ``rate`` and ``mix`` of :func:`plant_errors`; return the weights of every kind in
    :data:`ERROR_KINDS`, normalised to sum 1 (kinds ``mix`` leaves out weigh 0; ``None`` = equal)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
    weights = dict.fromkeys(ERROR_KINDS, 1.0) if mix is None else dict(mix)
    unknown = sorted(set(weights) - set(ERROR_KINDS))
    if unknown:
        raise ValueError(f"mix: unknown error kind(s) {unknown}; known kinds: {list(ERROR_KINDS)}")
    for kind, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mix.{kind}: weight must be a finite number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total == 0.0:
        if rate > 0:
            raise ValueError("mix: every weight is 0; give at least one error kind a weight > 0")
        return dict.fromkeys(ERROR_KINDS, 0.0)
    norm = {k: weights.get(k, 0.0) / total for k in ERROR_KINDS}
    if rate * sum(norm[k] for k in INSERTED_KINDS) >= 1.0:
        raise ValueError(
            f"rate: 1 cannot be reached with only inserted kinds {list(INSERTED_KINDS)} in mix "
            "(the true sentences would remain); add a kind that replaces sentences"
        )
    return norm


def _error_kinds(n_true: int, norm: dict[str, float], rate: float, rng: np.random.Generator) -> list[str]:
    """The kinds of the errors to plant in a description of ``n_true`` sentences.

    Kind k is due ``rate * w_k * L`` times in expectation, where ``L = n_true / (1 - rate * w_ins)``
    is the expected caption length (``w_ins``: the weight of the inserted kinds, which lengthen the
    caption). Systematic sampling: the kinds' expected counts are laid end to end on a line and
    points ``u, u + 1, u + 2, ...`` (``u`` uniform in [0, 1)) pick them, so every count is exact in
    expectation and kinds of one sentence (scene type, object count) never collide when their
    expected counts sum to at most 1.
    """
    inserted = sum(norm[k] for k in INSERTED_KINDS)
    length = n_true / (1.0 - rate * inserted)
    u = float(rng.random())
    kinds, start = [], 0.0
    for kind in _LINE_ORDER:
        end = start + rate * norm[kind] * length
        kinds += [kind] * (math.ceil(end - u) - math.ceil(start - u))
        start = end
    return kinds


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in _ATTRS)


def _differences(a: dict, b: dict) -> int:
    return sum(a[k] != b[k] for k in _ATTRS)


class _Planter:
    """Makes the false sentences of one caption of ``scene`` (see :func:`plant_errors`). Each
    method returns a sentence false of the scene in exactly its own way, or None if it cannot."""

    def __init__(self, scene: dict, rng: np.random.Generator, world: WorldConfig | None):
        self.scene, self.rng = scene, rng
        self.objs = scene["objects"]
        self.grid = scene.get("grid", 3)
        self.rels = relations(scene)
        self.cells = {(o["row"], o["col"]): o for o in self.objs}
        types = scene_types(world) if world is not None else ()
        self.types = [t["name"] for t in types] or list(SCENE_TYPES)
        self.signature = next((t["signature"] for t in types if t["name"] == scene["scene_type"]), [])
        self.absent_used: set[tuple[str, str]] = set()
        self.fillers_used: set[str] = set()

    def pick(self, items: list) -> Any:
        return items[int(self.rng.integers(len(items)))]

    def _exists(self, desc: dict) -> bool:
        return any(_same(o, desc) for o in self.objs)

    # replacements: the true sentence of one object, relation or the scene, changed
    def wrong_color(self, i: int) -> str | None:
        o = self.objs[i]
        colors = [c for c in COLORS if c != o["color"] and not self._exists({**o, "color": c})]
        return _object_sentence({**o, "color": self.pick(colors)}, self.grid) if colors else None

    def wrong_size(self, i: int) -> str | None:
        o = self.objs[i]
        sizes = [s for s in SIZES if s != o["size"] and not self._exists({**o, "size": s})]
        return _object_sentence({**o, "size": self.pick(sizes)}, self.grid) if sizes else None

    def wrong_position(self, i: int) -> str | None:
        """Another cell, empty or holding an object of another shape that differs from this one in
        at least one more attribute (so the sentence cannot be read as that object misdescribed)."""
        o = self.objs[i]

        def free(rc: tuple[int, int]) -> bool:
            occ = self.cells.get(rc)
            return occ is None or (occ["shape"] != o["shape"] and _differences(occ, o) >= 2)

        cells = [
            (r, c)
            for r in range(self.grid)
            for c in range(self.grid)
            if (r, c) != (o["row"], o["col"]) and free((r, c))
        ]
        if not cells:
            return None
        r, c = self.pick(cells)
        return _object_sentence({**o, "row": r, "col": c}, self.grid)

    def wrong_relation(self, k: int) -> str | None:
        """Relation k reversed or with the other relation word; if all of those happen to be true,
        one of its objects in that relation with an object it is not in that relation with."""
        i, rel, j = self.rels[k]
        desc = [_np(o) for o in self.objs]
        true = {(desc[a], r, desc[b]) for a, r, b in self.rels}

        def false(t: tuple[int, str, int]) -> bool:
            return desc[t[0]] != desc[t[2]] and (desc[t[0]], t[1], desc[t[2]]) not in true

        other = "left of" if rel == "above" else "above"
        cands = [t for t in ((j, rel, i), (i, other, j), (j, other, i)) if false(t)]
        cands = cands or [t for m in range(len(self.objs)) for t in ((i, rel, m), (m, rel, j)) if false(t)]
        if not cands:
            return None
        a, r, b = self.pick(cands)
        return _relation_sentence(self.objs[a], r, self.objs[b])

    def wrong_scene(self) -> str | None:
        st = self.scene["scene_type"]
        names = [t for t in self.types if t != st] or [t for t in SCENE_TYPES if t != st]
        return _header_sentence(self.scene, self.pick(names), len(self.objs))

    def wrong_count(self) -> str | None:
        n = len(self.objs)
        return _header_sentence(
            self.scene, self.scene["scene_type"], self.pick([m for m in (n - 2, n - 1, n + 1, n + 2) if m >= 1])
        )

    # insertions
    def absent_object(self) -> str:
        """A shape + colour found nowhere in the scene, in an empty cell if there is one (else in a
        cell whose object has another shape and another colour)."""
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid)]
        r, c = self.pick([rc for rc in cells if rc not in self.cells] or cells)
        occ = self.cells.get((r, c))
        present = {(o["shape"], o["color"]) for o in self.objs}

        def ok(shape: str, color: str) -> bool:
            return (shape, color) not in present and (occ is None or (shape != occ["shape"] and color != occ["color"]))

        def fresh(cands: list) -> list:
            return [x for x in cands if x not in self.absent_used] or cands

        sig = [(s["shape"], s["color"]) for s in self.signature if ok(s["shape"], s["color"])]
        if sig and self.rng.random() < COOCCURRENCE_PROB:
            shape, color = self.pick(fresh(sig))
        else:
            shape, color = self.pick(fresh([(s, col) for s in SHAPES for col in COLORS if ok(s, col)]))
        self.absent_used.add((shape, color))
        obj = {"shape": shape, "color": color, "size": self.pick(list(SIZES)), "row": r, "col": c}
        return _object_sentence(obj, self.grid)

    def filler(self) -> str:
        text = self.pick([f for f in FILLER_SENTENCES if f not in self.fillers_used] or list(FILLER_SENTENCES))
        self.fillers_used.add(text)
        return text

    def replace(self, kind: str, out: list[tuple[str, str]]) -> bool:
        """Replace a random still-true sentence that can take ``kind``; False if none can."""
        n_obj = len(self.objs)
        if kind in ("wrong_scene", "wrong_count"):
            targets: list[tuple[int, int | None]] = [(0, None)]
        elif kind == "wrong_relation":
            targets = [(1 + n_obj + k, k) for k in range(len(self.rels))]
        else:
            targets = [(1 + i, i) for i in range(n_obj)]
        make = getattr(self, kind)
        for t in self.rng.permutation(len(targets)):
            idx, arg = targets[int(t)]
            if out[idx][1] != "true":
                continue
            sentence = make() if arg is None else make(arg)
            if sentence is not None:
                out[idx] = (sentence, kind)
                return True
        return False


def plant_errors(
    scene: dict,
    rng: np.random.Generator,
    rate: float = 0.3,
    mix: dict[str, float] | None = None,
    *,
    world: WorldConfig | None = None,
) -> list[tuple[str, str]]:
    """The exact description of ``scene`` with false sentences planted: ``(sentence, label)`` in
    caption order, ``label`` ``"true"`` or a kind of :data:`ERROR_KINDS`. Join the sentences with
    ``" "`` for the caption text; with ``rate=0`` they are :func:`describe_sentences`.

    ``rate``: the share of the caption's sentences that are false, in expectation (expected false
    sentences = ``rate`` x expected caption length). ``mix``: relative weights of the kinds
    (``None``: all equal; a kind left out weighs 0). Replacement kinds (``wrong_*``) change one true
    sentence in place; inserted kinds (:data:`INSERTED_KINDS`) add a sentence at a random place
    after the first. How many of each kind: :func:`_error_kinds`. A replacement kind no sentence can
    take (no relation sentence left, the scene sentence already false) becomes the first kind of
    :data:`ERROR_FALLBACK` that one can, else an inserted ``absent_object``.

    ``world``: the scene's world config (``meta['world']`` of a sample), optional: wrong scene types
    are then the world's own, and an absent object is, with probability
    :data:`COOCCURRENCE_PROB`, one of the scene type's signature objects missing from the scene
    (a co-occurrence hallucination). Deterministic for the same scene, rng state and arguments.
    """
    norm = check_error_params(rate, mix)
    out = [(s, "true") for s in describe_sentences(scene)]
    planter = _Planter(scene, rng, world)
    inserted: list[tuple[str, str]] = []
    for kind in _error_kinds(len(out), norm, rate, rng):
        for k in (kind, *ERROR_FALLBACK.get(kind, ()), "absent_object"):
            if k in INSERTED_KINDS:
                inserted.append((getattr(planter, k)(), k))
                break
            if planter.replace(k, out):
                break
    for item in inserted:
        out.insert(int(rng.integers(1, len(out) + 1)), item)
    return out


# ---- pixels -------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    def ring(n: int, rad: float, phase: float) -> np.ndarray:
        a = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)

    if shape == "triangle":
        pts = ring(3, r, -np.pi / 2)
    elif shape == "diamond":
        pts = ring(4, r, -np.pi / 2)
    elif shape == "hexagon":
        pts = ring(6, r, 0)
    elif shape == "star":
        outer, inner = ring(5, r, -np.pi / 2), ring(5, r * 0.45, -np.pi / 2 + np.pi / 5)
        pts = np.stack([outer, inner], 1).reshape(-1, 2)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([cx + x * r / 17, cy + y * r / 17], 1)
    else:
        return None
    return [tuple(p) for p in pts]


def _background(scene: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene["background"]], np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 12)
    tex = scene["texture"]
    if tex == "striped":
        m = ((yy // (period // 2)) % 2).astype(np.float32)
    elif tex == "checkered":
        m = (((yy // period) + (xx // period)) % 2).astype(np.float32)
    elif tex == "dotted":
        m = (((yy % period) < period // 3) & ((xx % period) < period // 3)).astype(np.float32)
    elif tex == "wavy":
        m = (np.sin((yy + 2 * np.sin(xx * 2 * np.pi / (2 * period))) * 2 * np.pi / period) > 0).astype(np.float32)
    elif tex == "grainy":
        m = rng.random((size, size)).astype(np.float32)
    else:
        m = np.zeros((size, size), np.float32)
    img = base[None, None, :] * (1.0 - 0.18 * m[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: dict, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene: textured background, then each object in its grid cell."""
    rng = rng or np.random.default_rng(0)
    im = Image.fromarray(_background(scene, size, rng))
    draw = ImageDraw.Draw(im)
    cell = size / scene.get("grid", 3)
    for o in scene["objects"]:
        r = cell * (0.42 if o["size"] == "large" else 0.24)
        jitter = cell * 0.5 - r - 1
        cx = (o["col"] + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        cy = (o["row"] + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        col = COLORS[o["color"]]
        shape = o["shape"]
        poly = _polygon(shape, cx, cy, r)
        if poly is not None:
            draw.polygon(poly, fill=col)
        elif shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif shape == "ring":
            w = max(1, int(r * 0.4))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=w)
        elif shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=col)
        elif shape == "cross":
            t = r * 0.33
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=col)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=col)
        elif shape == "bar":
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=col)
        else:  # pragma: no cover - SHAPES and this function are kept in step by a test
            raise ValueError(f"no renderer for shape {shape!r}")
    return im


# ---- samples and shards ---------------------------------------------------------------


def make_sample(cfg: WorldConfig, split: str, index: int, seed: int = 0, group_size: int = 1) -> Sample:
    """Sample ``index`` of ``split``: a pure function of its arguments.

    With ``group_size`` k > 1, samples come in groups of k near-duplicates: the first of
    each group is a fresh scene, the others change one object of it (hard negatives).
    """
    if group_size > 1:
        g, member = divmod(index, group_size)
        scene = make_scene(cfg, np.random.default_rng([seed, _split_id(split), g, 0]))
        if member:
            scene = perturb_scene(scene, np.random.default_rng([seed, _split_id(split), g, member, 1]))
        scene["group"] = g
    else:
        scene = make_scene(cfg, np.random.default_rng([seed, _split_id(split), index, 0]))
    rng = np.random.default_rng([seed, _split_id(split), index, 2])
    caps = sparse_captions(scene, cfg, rng)
    buf = io.BytesIO()
    render(scene, cfg.image_size, rng).save(buf, format="PNG", optimize=False, compress_level=1)
    key = f"{split}_{index:08d}"
    return Sample(
        key=key,
        image=buf.getvalue(),
        image_ext="png",
        id=key,
        dataset="synthetic-world",
        split=split,
        sparse=caps,
        meta={"scene": json.dumps(scene, sort_keys=True), "world": json.dumps(asdict(cfg), sort_keys=True)},
    )


@dataclass
class SplitSpec:
    name: str
    count: int
    seed: int = 0
    group_size: int = 1


def _write_one_shard(args: tuple) -> dict:
    out_dir, cfg, spec, index, start, stop = args
    with ShardWriter(out_dir, spec.name, index) as w:
        for i in range(start, stop):
            w.write(make_sample(cfg, spec.name, i, spec.seed, spec.group_size))
        w.stats["world"] = asdict(cfg)
        w.stats["first_index"] = start
    return {"split": spec.name, "index": index, "count": stop - start}


def write_world(
    out_dir: str | Path,
    cfg: WorldConfig,
    splits: list[SplitSpec],
    *,
    shard_size: int = 1000,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the splits as shards, skipping complete ones (resumable), then the manifest."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(out_dir)
    done = {Path(p).name for p in completed_shards(out_dir)}
    jobs = []
    for spec in splits:
        if spec.count < 0:
            raise ValueError(f"split {spec.name!r}: count must be >= 0")
        for index, start in enumerate(range(0, spec.count, shard_size)):
            if shard_name(spec.name, index) not in done:
                jobs.append((out_dir, cfg, spec, index, start, min(spec.count, start + shard_size)))
    total = sum(j[5] - j[4] for j in jobs)
    with tqdm(total=total, desc="synthetic world", unit="img", disable=not progress) as bar:
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(num_workers) as ex:
                for r in ex.map(_write_one_shard, jobs):
                    bar.update(r["count"])
        else:
            for j in jobs:
                bar.update(_write_one_shard(j)["count"])
    return write_manifest(out_dir)


def iter_world(cfg: WorldConfig, spec: SplitSpec) -> Iterator[Sample]:
    for i in range(spec.count):
        yield make_sample(cfg, spec.name, i, spec.seed, spec.group_size)
