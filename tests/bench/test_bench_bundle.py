"""bench on a real (tiny, 2-step) vse bundle: the model path of `bench retrieval` and the stage."""

import json

import pytest

vse_train = pytest.importorskip("vse.train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from d2s.schema import DenseText
    from d2s.shards import ShardWriter, write_manifest
    from d2s.synthetic import SplitSpec, WorldConfig, describe, iter_world
    from vse.assets import build_assets

    root = tmp_path_factory.mktemp("bundle_world")
    world = root / "world"
    cfg = WorldConfig(world_seed=0)
    for spec in (SplitSpec("train", 64, 0), SplitSpec("test", 20, 0)):
        with ShardWriter(world, spec.name, 0) as w:
            for s in iter_world(cfg, spec):
                s.dense = [DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")]
                w.write(s)
    write_manifest(world)
    build_assets(world, root / "assets", ["tiny-vit"])
    doc = {
        "shards": str(world),
        "out": str(root / "run"),
        "assets": str(root / "assets"),
        "model": "tiny-vit",
        "recipe": "baseline",
        "steps": 2,
        "threads": 1,
        "val_every": 0,
        "tracker": "none",
        "log_every": 1,
        "save_every": 100,
        "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 16},
    }
    s = vse_train.train(vse_train.parse_config(doc))
    return world, s["bundle"]


@pytest.mark.slow
def test_cli_with_real_bundle_and_shards(trained, tmp_path):
    from bench.api import load_embeddings, read_results
    from bench.cli import main
    from d2s.retrieval import retrieval_metrics

    world, bundle = trained
    out = tmp_path / "res"
    rc = main(
        [
            "retrieval",
            "--bundle",
            str(bundle),
            "--shards",
            str(world),
            "--split",
            "test",
            "--save-embeddings",
            str(tmp_path / "emb.safetensors"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = read_results(out)
    assert set(res.benchmarks) == {"custom", "long_text"}
    assert res.benchmarks["custom"].n_images == 20 and res.benchmarks["custom"].n_texts == 100
    emb = load_embeddings(tmp_path / "emb.safetensors")
    assert res.benchmarks["custom"].metrics == retrieval_metrics(emb.img, emb.txt, emb.txt_to_img)


def test_stage_with_real_bundle(trained, tmp_path):
    from bench.api import read_results
    from d2s.pipeline import Runner, load_pipeline

    world, bundle = trained
    doc = {
        "stages": {
            "eval": {
                "type": "bench-retrieval",
                "params": {"split": "test", "chunk_size": 8},
                "inputs": {"bundle": str(bundle), "shards": str(world)},
            }
        }
    }
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    Runner(p).run()
    res = read_results(p.stage("eval").outputs["results"])
    assert res.benchmarks["long_text"].n_texts == 20 and res.source["split"] == "test"


def test_cli_names_shard_and_key_of_a_corrupt_image(trained, tmp_path, capsys):
    """The real bundle on a real shard holding a truncated PNG: bench fails naming shard and key."""
    from bench.cli import main
    from d2s.shards import ShardWriter, read_samples, write_manifest

    world, bundle = trained
    samples = read_samples(world, "test")
    bad = samples[7]
    bad.image = bad.image[: len(bad.image) // 2]
    with ShardWriter(tmp_path / "w", "test", 0) as w:
        for s in samples:
            w.write(s)
    write_manifest(tmp_path / "w")
    rc = main(
        [
            "retrieval",
            "--bundle",
            str(bundle),
            "--shards",
            str(tmp_path / "w"),
            "--split",
            "test",
            "--out",
            str(tmp_path / "res"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "test-000000.tar" in err and repr(bad.key) in err and "cannot decode" in err, err[-2000:]
