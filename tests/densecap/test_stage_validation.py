"""The densecap stage's params are checked when the pipeline is loaded (``d2s run --dry-run``):
every plug-in's params go through its registry, the user's data paths must exist, and
rank/world_size split the work between machines."""

from __future__ import annotations

import copy
import json

import pytest

from d2s.config import ConfigError
from d2s.pipeline import Runner, load_pipeline

BASE = {
    "name": "dc",
    "stages": {
        "world": {"type": "synthetic-world", "params": {"train": 8, "val": 4, "test": 0, "seed": 0, "shard_size": 4}},
        "captions": {
            "type": "densecap",
            "inputs": {"shards": "${world.shards}"},
            "params": {
                "source": {"type": "synthetic-world"},
                "caption_sources": [{"type": "synthetic-oracle"}],
                "filters": [{"type": "length"}, {"type": "grounding"}],
                "progress": False,
            },
        },
    },
}


def doc_with(**params) -> dict:
    doc = copy.deepcopy(BASE)
    doc["stages"]["captions"]["params"].update(params)
    return doc


def load(doc, tmp_path):
    return load_pipeline(doc=doc, run_dir=tmp_path / "run")


def test_good_pipeline_loads_without_a_source_path(tmp_path):
    # the source's 'path' comes from the stage's shards input, produced by the world stage
    p = load(BASE, tmp_path)
    params = p.stage("captions").params
    assert params.source.type == "synthetic-world" and "path" not in params.source.params
    assert (params.rank, params.world_size) == (0, 1)


VLLM = {"base_url": "http://127.0.0.1:8000", "model": "m"}


@pytest.mark.parametrize(
    "params, fields",
    [
        ({"caption_sources": [{"type": "synthetic-orcale"}]}, ["caption_sources[0].type", "synthetic-orcale"]),
        (
            {"caption_sources": [{"type": "vllm-server", "params": {**VLLM, "temperatur": 0.2}}]},
            ["caption_sources[0].params", "temperatur"],
        ),
        (
            {"caption_sources": [{"type": "vllm-server", "params": {**VLLM, "concurrency": "lots"}}]},
            ["caption_sources[0].params.concurrency"],
        ),
        (
            {
                "caption_sources": [
                    {"type": "synthetic-oracle"},
                    {"type": "vllm-server", "label": "v", "params": {**VLLM, "sampling": {"top_q": 0.9}}},
                ]
            },
            ["caption_sources[1].params.sampling", "top_q"],
        ),
        (
            {"caption_sources": [{"type": "import", "params": {"format": "table"}}]},
            ["caption_sources[0].params.path", "required"],
        ),
        ({"filters": [{"type": "length"}, {"type": "lenght"}]}, ["filters[1].type", "lenght"]),
        ({"filters": [{"type": "length", "params": {"min_words": "many"}}]}, ["filters[0].params.min_words"]),
        ({"filters": [{"type": "near-duplicate", "params": {"treshold": 0.5}}]}, ["filters[0].params", "treshold"]),
        ({"source": {"type": "shardz"}}, ["source.type", "shardz"]),
        ({"source": {"type": "shards", "params": {"spilt": "train"}}}, ["source.params", "spilt"]),
        ({"rank": 2, "world_size": 2}, ["rank"]),
        ({"world_size": 0}, ["world_size"]),
        ({"rank": -1}, ["rank"]),
    ],
)
def test_bad_params_name_stage_and_field(tmp_path, params, fields):
    with pytest.raises(ConfigError) as err:
        load(doc_with(**params), tmp_path)
    msg = str(err.value)
    assert "stage 'captions'" in msg, msg
    for f in fields:
        assert f in msg, msg
    assert not (tmp_path / "run").exists()  # nothing ran


def _karpathy(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    split = tmp_path / "dataset_coco.json"
    split.write_text(json.dumps({"dataset": "coco", "images": []}))
    return split, root


@pytest.mark.parametrize("missing", ["path", "image_root"])
def test_karpathy_paths_must_exist(tmp_path, missing):
    split, root = _karpathy(tmp_path)
    good = {"type": "karpathy", "params": {"path": str(split), "image_root": str(root)}}
    doc = doc_with(source=good)
    del doc["stages"]["captions"]["inputs"]
    load(doc, tmp_path)  # both exist: fine
    bad = copy.deepcopy(good)
    bad["params"][missing] = str(tmp_path / "nowhere")
    doc["stages"]["captions"]["params"]["source"] = bad
    with pytest.raises(ConfigError) as err:
        load(doc, tmp_path)
    assert "stage 'captions'" in str(err.value) and f"source.params.{missing}" in str(err.value)
    assert "nowhere" in str(err.value)


def test_folder_paths_must_exist(tmp_path):
    (tmp_path / "photos").mkdir()
    doc = doc_with(source={"type": "folder", "params": {"path": str(tmp_path / "photos")}})
    del doc["stages"]["captions"]["inputs"]
    load(doc, tmp_path)
    for params, field in (
        ({"path": str(tmp_path / "fotos")}, "source.params.path"),
        ({"path": str(tmp_path / "photos"), "captions": str(tmp_path / "caps.csv")}, "source.params.captions"),
    ):
        doc["stages"]["captions"]["params"]["source"] = {"type": "folder", "params": params}
        with pytest.raises(ConfigError, match=r"stage 'captions'.*" + field.replace(".", r"\.")):
            load(doc, tmp_path)


def test_dry_run_cli_reports_the_field(tmp_path, capsys):
    import yaml

    from d2s.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc_with(filters=[{"type": "length", "params": {"max_word": 10}}])))
    rc = main(["run", str(path), "--dry-run", "--run-dir", str(tmp_path / "run")])
    assert rc != 0
    out = capsys.readouterr()
    assert "filters[0].params" in out.out + out.err and "max_word" in out.out + out.err


def test_two_ranks_share_one_output(tmp_path):
    """rank 0 of 2 does its units and stops (the others are missing); rank 1 completes the
    set, writes the manifest and goes on; rank 0 rerun then finds the stage done (rank and
    world_size are execution params: one dataset, one cache key)."""
    doc = copy.deepcopy(BASE)
    run0 = load_pipeline(
        doc=doc, overrides=["captions.params.rank=0", "captions.params.world_size=2"], run_dir=tmp_path / "run"
    )
    out = run0.stage("captions").outputs["shards"]
    with pytest.raises(RuntimeError, match="rank 0/2 finished its 2 unit"):
        Runner(run0).run()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert not (out / "manifest.json").exists()

    run1 = load_pipeline(
        doc=doc, overrides=["captions.params.rank=1", "captions.params.world_size=2"], run_dir=tmp_path / "run"
    )
    report = Runner(run1).run()
    assert report[-1]["summary"]["captions_kept"] == 4  # only rank 1's units were captioned here
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 8 and manifest["splits"]["val"]["count"] == 4

    again = Runner(
        load_pipeline(
            doc=doc, overrides=["captions.params.rank=0", "captions.params.world_size=2"], run_dir=tmp_path / "run"
        )
    ).run()
    assert again[-1]["action"] == "skip"
    assert json.loads((out / "manifest.json").read_text()) == manifest
