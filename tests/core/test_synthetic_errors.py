"""Planted errors (d2s.synthetic.plant_errors), checked against the scene by an independent reader.

`classify` below parses each sentence with its own small grammar over the world's vocabulary and
decides from the scene JSON alone whether it is true or false, and in which way. It shares no code
with the generator beyond the vocabulary lists.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from d2s.synthetic import (
    BACKGROUNDS,
    COLORS,
    ERROR_KINDS,
    SCENE_TYPES,
    SHAPES,
    SIZES,
    TEXTURES,
    WorldConfig,
    describe,
    describe_sentences,
    make_scene,
    plant_errors,
    scene_types,
)

ATTRS = ("size", "color", "shape")
_NP = rf"(?:{'|'.join(SIZES)}) (?:{'|'.join(COLORS)}) (?:{'|'.join(SHAPES)})"
HEADER = re.compile(r"An? (?P<type>\w+) scene on an? (?P<tex>\w+) (?P<bg>\w+) background with (?P<n>\d+) objects\.")
OBJECT = re.compile(rf"At the (?P<pos>[a-z0-9 ]+?) there is an? (?P<np>{_NP})\.")
RELATION = re.compile(rf"The (?P<a>{_NP}) is (?P<rel>above|left of) the (?P<b>{_NP})\.")
ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLS = {"left": 0, "center": 1, "right": 2}
PLACE_WORDS = {*ROWS, *COLS, "row", "column"}
VOCAB = {*SHAPES, *COLORS, *SIZES, *SCENE_TYPES, *TEXTURES, *BACKGROUNDS, *PLACE_WORDS}


def cell_of(pos: str, grid: int) -> tuple[int, int]:
    """'top left' / 'top' / 'left' / 'center' (3x3) or 'row R column C' -> (row, col)."""
    m = re.fullmatch(r"row (\d+) column (\d+)", pos)
    if m:
        assert grid != 3, pos
        return int(m[1]) - 1, int(m[2]) - 1
    assert grid == 3, pos
    words = pos.split()
    if words == ["center"]:
        return 1, 1
    if len(words) == 2:
        return ROWS[words[0]], COLS[words[1]]
    return (ROWS[words[0]], 1) if words[0] in ROWS else (1, COLS[words[0]])


def noun(text: str) -> dict:
    size, color, shape = text.split()
    return {"size": size, "color": color, "shape": shape}


def same(o: dict, said: dict) -> bool:
    return all(o[k] == said[k] for k in ATTRS)


def classify_object(pos: str, said: dict, scene: dict) -> str:
    objs = scene["objects"]
    row, col = cell_of(pos, scene.get("grid", 3))
    occ = next((o for o in objs if (o["row"], o["col"]) == (row, col)), None)
    differ = [k for k in ATTRS if occ is not None and occ[k] != said[k]]
    anywhere = any(same(o, said) for o in objs)
    if occ is not None and not differ:
        return "true"
    if occ is not None and differ in (["color"], ["size"]) and not anywhere:
        return "wrong_" + differ[0]
    far = occ is None or (occ["shape"] != said["shape"] and len(differ) >= 2)
    if far and anywhere:
        return "wrong_position"
    if far and not any(o["shape"] == said["shape"] and o["color"] == said["color"] for o in objs):
        return "absent_object"
    return f"ambiguous object sentence (occupant {occ})"


def classify_relation(a: dict, rel: str, b: dict, scene: dict) -> str:
    objs = scene["objects"]
    firsts, seconds = [o for o in objs if same(o, a)], [o for o in objs if same(o, b)]
    if not firsts or not seconds:
        return "relation naming an object that is not there"

    def holds(x: dict, y: dict) -> bool:
        if rel == "above":
            return x["col"] == y["col"] and y["row"] == x["row"] + 1
        return x["row"] == y["row"] and y["col"] == x["col"] + 1

    return "true" if any(holds(x, y) for x in firsts for y in seconds) else "wrong_relation"


def classify(sentence: str, scene: dict) -> str:
    """'true', the kind of error, or a description of why the sentence fits no kind."""
    if m := HEADER.fullmatch(sentence):
        wrong = {
            k
            for k, ok in (
                ("type", m["type"] == scene["scene_type"]),
                ("texture", m["tex"] == scene["texture"]),
                ("background", m["bg"] == scene["background"]),
                ("count", int(m["n"]) == len(scene["objects"])),
            )
            if not ok
        }
        named = {(): "true", ("type",): "wrong_scene", ("count",): "wrong_count"}
        return named.get(tuple(sorted(wrong)), f"scene sentence wrong in {sorted(wrong)}")
    if m := OBJECT.fullmatch(sentence):
        return classify_object(m["pos"], noun(m["np"]), scene)
    if m := RELATION.fullmatch(sentence):
        return classify_relation(noun(m["a"]), m["rel"], noun(m["b"]), scene)
    words = re.findall(r"[a-z]+", sentence.lower())
    if (
        sentence.endswith(".")
        and not re.search(r"\d", sentence)
        and not any(w in VOCAB or w.rstrip("s") in VOCAB for w in words)
    ):
        return "filler"  # names nothing of this world: true of any of its images, says nothing of this one
    return "unparsed"


def random_scene(i: int) -> tuple[dict, WorldConfig]:
    """Scenes of several worlds: default, crowded 3x3, 4x4 grid, few scene types."""
    cfgs = [
        WorldConfig(),
        WorldConfig(min_objects=1, max_objects=9, world_seed=3),
        WorldConfig(grid=4, min_objects=2, max_objects=12, world_seed=1),
        WorldConfig(num_scene_types=2, signature_prob=1.0, max_objects=5),
    ]
    cfg = cfgs[i % len(cfgs)]
    return make_scene(cfg, np.random.default_rng([11, i])), cfg


def check_caption(scene: dict, planted: list[tuple[str, str]]) -> Counter:
    """Every label right; structure: replacements in place, insertions after the first sentence."""
    truth = describe_sentences(scene)
    for sentence, label in planted:
        assert label == "true" or label in ERROR_KINDS, label
        assert classify(sentence, scene) == label, (sentence, label, scene)
        assert sentence.endswith(".") and ". " not in sentence
    kept = [(s, label) for s, label in planted if label not in ("absent_object", "filler")]
    assert len(kept) == len(truth)  # replacements replace, nothing else is dropped or reordered
    for (sentence, label), original in zip(kept, truth):
        assert (sentence == original) == (label == "true")
    assert planted[0][1] not in ("absent_object", "filler")
    text = " ".join(s for s, _ in planted)
    assert re.split(r"(?<=\.) ", text) == [s for s, _ in planted]
    return Counter(label for _, label in planted)


def test_describe_sentences_of_a_hand_made_scene():
    scene = {
        "scene_type": "office",
        "background": "sky",
        "texture": "wavy",
        "grid": 3,
        "objects": [
            {"shape": "star", "color": "red", "size": "small", "row": 0, "col": 1},
            {"shape": "ring", "color": "blue", "size": "large", "row": 1, "col": 1},
            {"shape": "heart", "color": "orange", "size": "small", "row": 1, "col": 2},
        ],
    }
    want = [
        "A office scene on a wavy sky background with 3 objects.",
        "At the top there is a small red star.",
        "At the center there is a large blue ring.",
        "At the right there is a small orange heart.",
        "The small red star is above the large blue ring.",
        "The large blue ring is left of the small orange heart.",
    ]
    assert describe_sentences(scene) == want
    assert describe(scene) == " ".join(want)
    assert plant_errors(scene, np.random.default_rng(0), 0.0) == [(s, "true") for s in want]


def test_every_label_is_right_over_thousands_of_scenes():
    kinds: Counter = Counter()
    fillers = set()
    rng = np.random.default_rng(1)
    for i in range(3000):
        scene, cfg = random_scene(i)
        assert describe(scene) == " ".join(describe_sentences(scene))
        rate = float(rng.choice([0.0, 0.1, 0.3, 0.6, 1.0]))
        mix = None if i % 3 == 0 else {k: float(w) for k, w in zip(ERROR_KINDS, rng.random(8) * (rng.random(8) < 0.7))}
        if mix is not None and sum(mix.values()) == 0:
            mix["wrong_relation"] = 1.0
        if rate == 1.0 and mix is not None:
            mix["wrong_color"] = mix["wrong_color"] + 0.5  # rate 1 needs a replacing kind
        planted = plant_errors(scene, np.random.default_rng([7, i]), rate, mix, world=cfg if i % 2 else None)
        if rate == 0.0:
            assert [s for s, _ in planted] == describe_sentences(scene)
        kinds += check_caption(scene, planted)
        fillers |= {s for s, label in planted if label == "filler"}
    assert set(kinds) == {"true", *ERROR_KINDS} and min(kinds.values()) > 300, kinds
    assert len(fillers) >= 6, fillers


def _shares(rate: float, mix: dict | None, n_scenes: int) -> tuple[Counter, int]:
    """Kinds found by the independent reader over scenes where no kind ever needs a fallback."""
    cfg = WorldConfig(min_objects=3, max_objects=4)
    found: Counter = Counter()
    total, i = 0, 0
    while n_scenes:
        i += 1
        scene = make_scene(cfg, np.random.default_rng([23, i]))
        descs = [(o["color"], o["shape"]) for o in scene["objects"]]
        if len(set(descs)) < len(descs) or len(describe_sentences(scene)) == 1 + len(descs):
            continue  # a repeated colour + shape, or no relation sentence
        n_scenes -= 1
        planted = plant_errors(scene, np.random.default_rng([29, i]), rate, mix)
        found += Counter(classify(s, scene) for s, _ in planted)
        total += len(planted)
    return found, total


@pytest.mark.parametrize(
    "rate, mix",
    [
        (0.3, None),
        (
            0.5,
            {
                "absent_object": 3,
                "wrong_color": 2,
                "filler": 1,
                "wrong_relation": 1,
                "wrong_scene": 1,
                "wrong_position": 1,
            },
        ),
    ],
)
def test_realised_share_per_kind_matches_rate_and_mix(rate, mix):
    found, total = _shares(rate, mix, 2500)
    weights = dict.fromkeys(ERROR_KINDS, 1.0) if mix is None else {k: float(mix.get(k, 0)) for k in ERROR_KINDS}
    norm = sum(weights.values())

    def close(count: int, p: float) -> bool:
        return abs(count - p * total) <= 4 * math.sqrt(total * p * (1 - p)) + 1

    for kind in ERROR_KINDS:
        p = rate * weights[kind] / norm
        assert close(found[kind], p), (kind, found[kind], p * total, total)
    assert close(total - found["true"], rate), (total - found["true"], rate * total)
    assert set(found) <= {"true", *ERROR_KINDS}


def _scene(*cells, scene_type="park") -> dict:
    shapes = ["star", "ring", "heart", "cross", "bar", "circle"]
    objs = [{"shape": shapes[k], "color": "red", "size": "small", "row": r, "col": c} for k, (r, c) in enumerate(cells)]
    return {"scene_type": scene_type, "background": "sand", "texture": "plain", "grid": 3, "objects": objs}


def test_fallbacks():
    corners = _scene((0, 0), (0, 2), (2, 0))  # no neighbours: no relation sentence
    for seed in range(20):
        # no relation sentence: a wrong relation becomes a wrong position
        labels = Counter(
            label for _, label in plant_errors(corners, np.random.default_rng(seed), 0.25, {"wrong_relation": 1})
        )
        assert labels == {"true": 3, "wrong_position": 1}, labels
        # 2 scene-type errors due, one scene sentence: the second becomes a wrong count, which finds
        # the scene sentence taken too, then a wrong colour
        planted = plant_errors(corners, np.random.default_rng(seed), 0.5, {"wrong_scene": 1})
        assert Counter(label for _, label in planted) == {"true": 2, "wrong_scene": 1, "wrong_color": 1}
        check_caption(corners, planted)


def test_rate_one_leaves_no_true_sentence():
    for i in range(300):
        scene, cfg = random_scene(i)
        planted = plant_errors(scene, np.random.default_rng(i), 1.0, world=cfg)
        assert "true" not in {label for _, label in planted}
        check_caption(scene, planted)


def test_deterministic_for_the_same_rng_state():
    for i in range(50):
        scene, cfg = random_scene(i)
        a = plant_errors(scene, np.random.default_rng([3, i]), 0.4, world=cfg)
        assert a == plant_errors(scene, np.random.default_rng([3, i]), 0.4, world=cfg)
    differ = sum(
        plant_errors(random_scene(i)[0], np.random.default_rng([3, i]), 0.4)
        != plant_errors(random_scene(i)[0], np.random.default_rng([4, i]), 0.4)
        for i in range(50)
    )
    assert differ >= 40


def test_absent_objects_of_a_world_are_often_its_scene_types_objects():
    cfg = WorldConfig()
    sig = {t["name"]: {(s["shape"], s["color"]) for s in t["signature"]} for t in scene_types(cfg)}

    def share(world):
        hits = n = 0
        for i in range(600):
            scene = make_scene(cfg, np.random.default_rng([31, i]))
            for s, label in plant_errors(scene, np.random.default_rng(i), 0.4, {"absent_object": 1}, world=world):
                if label == "absent_object":
                    said = noun(OBJECT.fullmatch(s)["np"])
                    hits += (said["shape"], said["color"]) in sig[scene["scene_type"]]
                    n += 1
        return hits / n

    assert share(cfg) > 0.35 and share(None) < 0.15


@pytest.mark.parametrize(
    "rate, mix, match",
    [
        (1.5, None, r"rate must be a number in \[0, 1\], got 1.5"),
        (-0.1, None, "rate must be"),
        (float("nan"), None, "rate must be"),
        (0.3, {"wrong_colour": 1.0}, r"mix: unknown error kind\(s\) \['wrong_colour'\]"),
        (0.3, {"wrong_color": -1.0}, r"mix.wrong_color: weight must be a finite number >= 0, got -1.0"),
        (0.3, {"wrong_color": float("inf")}, "mix.wrong_color: weight"),
        (0.3, {"wrong_color": 0.0}, "mix: every weight is 0"),
        (1.0, {"filler": 1.0, "absent_object": 2.0}, "rate: 1 cannot be reached with only inserted kinds"),
    ],
)
def test_bad_params_are_named(rate, mix, match):
    scene, _ = random_scene(0)
    with pytest.raises(ValueError, match=match):
        plant_errors(scene, np.random.default_rng(0), rate, mix)
