import json
import re

import numpy as np
import pytest

from d2s.shards import completed_shards, iter_samples, split_shards
from d2s.synthetic import (
    COLORS,
    SHAPES,
    SIZES,
    SplitSpec,
    WorldConfig,
    describe,
    make_sample,
    render,
    scene_types,
    write_world,
)

CFG = WorldConfig()
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
SIZE_RE = "|".join(SIZES)
# An independent reading of the caption language: noun phrases, positions, relations.
NP = rf"an? (?:(?P<{{p}}size>{SIZE_RE}) )?(?:(?P<{{p}}color>{COLOR_RE}) )?(?P<{{p}}shape>{SHAPE_RE})"
POS = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}


def matches(obj, m, p=""):
    return all(m.group(p + a) in (None, obj[a]) for a in ("size", "color")) and obj["shape"] == m.group(p + "shape")


def caption_is_true(cap: str, scene: dict) -> bool:
    objs = scene["objects"]
    rel = re.fullmatch(NP.format(p="a") + r" (?P<rel>above|left of) " + NP.format(p="b"), cap)
    if rel:

        def neighbour(a, b):
            if rel["rel"] == "above":
                return a["col"] == b["col"] and b["row"] == a["row"] + 1
            return a["row"] == b["row"] and b["col"] == a["col"] + 1

        return any(matches(a, rel, "a") and matches(b, rel, "b") and neighbour(a, b) for a in objs for b in objs)
    sc = re.fullmatch(r"an? (?P<type>\w+) scene with " + NP.format(p="a"), cap)
    if sc:
        return sc["type"] == scene["scene_type"] and any(matches(o, sc, "a") for o in objs)
    m = re.fullmatch(
        NP.format(p="a")
        + r"(?: and "
        + NP.format(p="b")
        + r")?(?: at the (?P<pos>[a-z ]+)| on an? (?P<tex>\w+) background)?",
        cap,
    )
    if not m:
        return False
    if m["tex"] and m["tex"] != scene["texture"]:
        return False
    cand_a = [o for o in objs if matches(o, m, "a") and (not m["pos"] or (o["row"], o["col"]) == POS[m["pos"]])]
    if not cand_a:
        return False
    if m["bshape"]:
        return any(matches(o, m, "b") for o in objs if any(o is not a for a in cand_a) or len(cand_a) > 1)
    return True


def scene_of(s):
    return json.loads(s.meta["scene"])


def test_deterministic_and_independent_of_order():
    a = [make_sample(CFG, "train", i) for i in (5, 3, 9)]
    b = [make_sample(CFG, "train", i) for i in (9, 3, 5)][::-1]
    assert [s.image for s in a] == [s.image for s in b] and [s.sparse for s in a] == [s.sparse for s in b]
    assert make_sample(CFG, "train", 0).image != make_sample(CFG, "train", 0, seed=1).image
    assert make_sample(CFG, "train", 0).image != make_sample(CFG, "val", 0).image


def test_every_sparse_caption_is_true_and_dense_covers_every_object():
    for i in range(300):
        s = make_sample(CFG, "train", i)
        scene = scene_of(s)
        assert len(s.sparse) == 5
        for cap in s.sparse:
            assert caption_is_true(cap, scene), (cap, scene)
        dense = describe(scene)
        for o in scene["objects"]:
            assert f"{o['size']} {o['color']} {o['shape']}" in dense
        assert scene["scene_type"] in dense and scene["background"] in dense
        assert 25 <= len(dense.split()) <= 200


def test_checker_rejects_false_captions():
    scene = scene_of(make_sample(CFG, "train", 0))
    absent = next(
        (c, s) for c in COLORS for s in SHAPES if not any(o["color"] == c and o["shape"] == s for o in scene["objects"])
    )
    assert not caption_is_true(f"a {absent[0]} {absent[1]}", scene)
    other = next(t["name"] for t in scene_types(CFG) if t["name"] != scene["scene_type"])
    o = scene["objects"][0]
    assert not caption_is_true(f"a {other} scene with a {o['color']} {o['shape']}", scene)


def test_sparse_captions_are_partial_and_scene_types_share_objects():
    words = []
    for i in range(100):
        s = make_sample(CFG, "train", i)
        n = len(scene_of(s)["objects"])
        for cap in s.sparse:
            assert len(re.findall(SHAPE_RE, cap)) <= 2 < n or n <= 2
            words.append(len(cap.split()))
    assert 3 <= np.mean(words) <= 12
    sigs = [{(o["shape"], o["color"]) for o in t["signature"]} for t in scene_types(CFG)]
    shared = sum(len(a & b) for i, a in enumerate(sigs) for b in sigs[i + 1 :])
    assert shared >= len(sigs)  # signature objects recur across scene types (hard negatives)


def test_scene_type_predicts_unmentioned_objects():
    """The premise D2S needs: knowing the scene type tells you about the other objects."""
    counts = {}
    for i in range(600):
        sc = scene_of(make_sample(CFG, "train", i))
        c = counts.setdefault(sc["scene_type"], {})
        for o in sc["objects"]:
            c[(o["shape"], o["color"])] = c.get((o["shape"], o["color"]), 0) + 1
    for t in scene_types(CFG):
        c = counts[t["name"]]
        sig = sum(v for k, v in c.items() if any((s["shape"], s["color"]) == k for s in t["signature"]))
        assert sig / sum(c.values()) > 0.6


def test_near_duplicate_groups_differ_in_one_attribute():
    for g in range(20):
        base = scene_of(make_sample(CFG, "test", g * 4, group_size=4))
        for m in range(1, 4):
            other = scene_of(make_sample(CFG, "test", g * 4 + m, group_size=4))
            diffs = [(a, k) for a, b in zip(base["objects"], other["objects"]) for k in a if a[k] != b[k]]
            assert len(diffs) == 1 and other["group"] == base["group"] == g


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_visibly(shape):
    scene = {
        "scene_type": "park",
        "background": "sand",
        "texture": "plain",
        "grid": 3,
        "objects": [{"shape": shape, "color": "blue", "size": "large", "row": 1, "col": 1}],
    }
    img = np.asarray(render(scene, 64))
    assert (np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1) > 60).sum() > 40


def test_write_world_resumes_and_matches(tmp_path):
    specs = [SplitSpec("train", 25), SplitSpec("val", 10, group_size=2)]
    write_world(tmp_path, CFG, specs, shard_size=10, progress=False)
    first = {p: s["count"] for p, s in completed_shards(tmp_path).items()}
    assert sorted(first.values()) == [5, 10, 10, 10]
    # lose one shard's marker and a half-written file: a rerun rewrites exactly that shard
    victim = tmp_path / "train-000001.tar"
    (tmp_path / "train-000001.stats.json").unlink()
    (tmp_path / "train-000002.tar.tmp").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar") if p != victim}
    write_world(tmp_path, CFG, specs, shard_size=10, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar") if p != victim}
    assert before == after and not list(tmp_path.glob("*.tmp"))
    got = list(iter_samples(split_shards(tmp_path, "train")))
    assert [s.key for s in got] == [f"train_{i:08d}" for i in range(25)]
    assert got[13].image == make_sample(CFG, "train", 13).image


def test_bad_world_config_is_rejected():
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=5, max_objects=2)
    with pytest.raises(ValueError, match="signature_prob"):
        WorldConfig(signature_prob=1.5)


def test_stage_writes_a_disjoint_pretrain_split_only_when_asked(tmp_path):
    import logging

    from d2s.config import ConfigError, from_dict
    from d2s.pipeline import StageContext
    from d2s.shards import read_manifest
    from d2s.stages import SyntheticWorldParams, SyntheticWorldStage

    def run(out, **params):
        p = from_dict(SyntheticWorldParams, {"shard_size": 10, "num_workers": 1, **params}, "params")
        ctx = StageContext("world", tmp_path, tmp_path / "work", p, {}, {"shards": out}, logging.getLogger("t"))
        return SyntheticWorldStage().run(ctx)

    assert run(tmp_path / "a", train=12, val=4, test=4) == {"train": 12, "val": 4, "test": 4}
    assert "pretrain" not in read_manifest(tmp_path / "a")["splits"]
    counts = run(tmp_path / "b", train=12, val=4, test=4, pretrain=15)
    assert counts == {"train": 12, "val": 4, "test": 4, "pretrain": 15}
    pre = list(iter_samples(split_shards(tmp_path / "b", "pretrain")))
    others = [s for split in ("train", "val", "test") for s in iter_samples(split_shards(tmp_path / "b", split))]
    assert [s.key for s in pre] == [f"pretrain_{i:08d}" for i in range(15)]
    assert all(s.split == "pretrain" and len(s.sparse) == CFG.captions_per_image for s in pre)
    # disjoint images (and scenes) from every other split, same world
    assert not {s.image for s in pre} & {s.image for s in others}
    assert not {s.meta["scene"] for s in pre} & {s.meta["scene"] for s in others}
    assert {s.meta["world"] for s in pre} == {s.meta["world"] for s in others}
    # the other splits are unchanged by the extra split
    assert [s.image for s in others[:12]] == [make_sample(CFG, "train", i).image for i in range(12)]
    with pytest.raises(ConfigError, match="pretrain must be >= 0"):
        from_dict(SyntheticWorldParams, {"pretrain": -1}, "params")
