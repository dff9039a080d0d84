"""The synthetic-errors caption source: planted false sentences with their truth, end to end."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from d2s.schema import Sample
from d2s.shards import completed_shards, iter_samples
from d2s.synthetic import ERROR_KINDS, describe
from densecap.caption_sources import CAPTION_SOURCES
from densecap.cli import main
from tests.core.test_synthetic_errors import classify


def run(*args) -> int:
    return main(["run", "--no-progress", *map(str, args)])


def inputs(world_dir: Path) -> dict[str, Sample]:
    return {s.key: s for s in iter_samples(sorted(completed_shards(world_dir)))}


def source(**params):
    return CAPTION_SOURCES.create("synthetic-errors", params, "params")


def caption(src, samples: list[Sample]):
    return asyncio.run(src.caption(samples))


def by_label(s: Sample) -> dict:
    return {d.source: d for d in s.dense}


def test_run_writes_truth_that_round_trips(world_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--input", world_dir, "--out", out, "--filters", "none"]
    args += ["--caption-source", "synthetic-oracle", "--caption-source", "synthetic-errors"]
    args += ["--caption-source", "synthetic-errors=exact", "-C", "1:rate=0.5", "-C", "1:seed=3", "-C", "2:rate=0"]
    assert run(*args) == 0
    got = {s.key: s for s in iter_samples(sorted(completed_shards(out)))}
    src = source(rate=0.5, seed=3)
    direct = dict(zip(inputs(world_dir), caption(src, list(inputs(world_dir).values()))))
    assert sorted(got) == sorted(direct) and len(got) == 32
    labels: Counter = Counter()
    for key, s in got.items():
        scene = json.loads(s.meta["scene"])
        d = by_label(s)
        planted, exact = d["synthetic-errors"], d["exact"]
        # rate 0: the oracle's text, every sentence true
        assert exact.text == d["synthetic-oracle"].text == describe(scene)
        assert {t.label for t in exact.truth} == {"true"} and " ".join(t.text for t in exact.truth) == exact.text
        # the planted caption: text and truth as the source made them, each label right
        assert planted.text == " ".join(t.text for t in planted.truth) and planted.truth == direct[key].truth
        assert planted.model == "d2s.synthetic.plant_errors" and planted.error == "" and planted.verdict == "keep"
        assert planted.params["rate"] == 0.5 and planted.params["seed"] == 3.0
        assert all(planted.params[f"mix.{k}"] == 1.0 for k in ERROR_KINDS)
        for t in planted.truth:
            assert classify(t.text, scene) == t.label, (t, scene)
        labels += Counter(t.label for t in planted.truth)
    assert len(labels) >= 6 and 0.3 < 1 - labels["true"] / sum(labels.values()) < 0.7, labels
    check_webdataset(out, got)
    check_hf_datasets(out, got, tmp_path, monkeypatch)


def check_webdataset(out: Path, got: dict[str, Sample]) -> None:
    import webdataset as wds

    rows = list(wds.WebDataset(sorted(completed_shards(out)), shardshuffle=False).decode())
    assert len(rows) == 32
    for row in rows:
        dense = {d["source"]: d for d in row["json"]["dense"]}
        want = [asdict(t) for t in by_label(got[row["__key__"]])["synthetic-errors"].truth]
        assert dense["synthetic-errors"]["truth"] == want and want


def check_hf_datasets(out: Path, got: dict[str, Sample], tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for split, n in (("train", 24), ("val", 8)):
        ds = datasets.load_dataset(
            "webdataset",
            data_files={split: str(out / f"{split}-*.tar")},
            split=split,
            cache_dir=str(tmp_path / "hf-cache"),
        )
        assert ds.num_rows == n
        for key, doc in zip(ds["__key__"], ds["json"]):
            dense = {d["source"]: d for d in doc["dense"]}
            for label in ("synthetic-errors", "exact"):
                want = [asdict(t) for t in by_label(got[key])[label].truth]
                assert dense[label]["truth"] == want, (key, label)
            assert dense["synthetic-oracle"]["truth"] == []


def test_captions_depend_only_on_seed_and_key(world_dir):
    samples = list(inputs(world_dir).values())
    src = source(rate=0.4, seed=7)
    together = caption(src, samples)
    one_by_one = [caption(source(rate=0.4, seed=7), [s])[0] for s in reversed(samples)][::-1]
    assert [d.text for d in together] == [d.text for d in one_by_one]
    assert [d.truth for d in together] == [d.truth for d in one_by_one]
    other_seed = caption(source(rate=0.4, seed=8), samples)
    assert sum(a.text != b.text for a, b in zip(together, other_seed)) >= 24
    # same scene under another key: other errors
    moved = Sample(**{**asdict(samples[0]), "key": "elsewhere_0", "dense": []})
    assert caption(src, [moved])[0].text != together[0].text


def test_resumed_run_plants_the_same_errors(world_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--input", world_dir, "--out", out, "--filters", "none", "--caption-source", "synthetic-errors"]
    assert run(*args) == 0
    first = {s.key: s.dense[0].text for s in iter_samples(sorted(completed_shards(out)))}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.stats.json").unlink()  # an interrupted shard: redone on the rerun
    assert run(*args, "--num-workers", 2) == 0
    redone = {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert redone == {"train-000001.tar"}
    again = {s.key: s.dense[0].text for s in iter_samples(sorted(completed_shards(out)))}
    assert again == first and len(first) == 32


def test_images_without_a_scene_get_an_error_record(world_dir):
    s = next(iter(inputs(world_dir).values()))
    plain = Sample(**{**asdict(s), "meta": {}, "dense": []})
    bad_world = Sample(**{**asdict(s), "meta": {**s.meta, "world": json.dumps({"grid": 99})}, "dense": []})
    bad_scene = Sample(**{**asdict(s), "meta": {"scene": "{not json"}, "dense": []})
    no_scene, world, broken = caption(source(), [plain, bad_world, bad_scene])
    assert no_scene.verdict == "error" and "no meta['scene']" in no_scene.error and no_scene.truth == []
    assert world.verdict == "error" and "grid must be in [2, 6]" in world.error
    assert broken.verdict == "error" and "JSONDecodeError" in broken.error


@pytest.mark.parametrize(
    "opt, message",
    [
        ("rate=1.5", "caption_sources[0].params: rate must be a number in [0, 1], got 1.5"),
        ("rate=-0.2", "caption_sources[0].params: rate must be a number in [0, 1], got -0.2"),
        ("mix.wrong_colour=1", "caption_sources[0].params: mix: unknown error kind(s) ['wrong_colour']"),
        ("mix.filler=-1", "caption_sources[0].params: mix.filler: weight must be a finite number >= 0, got -1.0"),
        ("mix.filler=0", "caption_sources[0].params: mix: every weight is 0"),
        ("seed=x", "caption_sources[0].params.seed: expected an integer, got 'x'"),
    ],
)
def test_bad_params_fail_naming_the_field(world_dir, tmp_path, caplog, opt, message):
    args = ["--input", world_dir, "--out", tmp_path / "o", "--caption-source", "synthetic-errors", "-C", opt]
    assert run(*args) == 2
    assert message in caplog.text
    assert not (tmp_path / "o").exists() or not completed_shards(tmp_path / "o")
