"""bench on a real (tiny, 2-step) vse bundle: the model path of `bench retrieval` and the stage."""

import json
import os
import subprocess
import sys

import pytest

vse_train = pytest.importorskip("vse_train.train")

TRAIN_EXTRA = ("accelerate", "tensorboard", "webdataset")  # d2s-vse[train]


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
    from vse_train.config import parse_config

    s = vse_train.train(parse_config(doc))
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
    # the manifest names the bundle by its hash and the bundle's own maximum text length
    from vse.bundle import load_bundle

    model = res.benchmarks["long_text"].manifest["model"]
    assert model["text_max_tokens"] == load_bundle(bundle).text_max_length > 0 and len(model["sha256"]) == 64
    assert res.benchmarks["custom"].manifest["data"]["files"] == {"test-000000.tar": shard_sha256(world)}


def shard_sha256(world):
    from bench.manifest import file_sha256

    return file_sha256(next(world.glob("test-*.tar")))


@pytest.mark.slow
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


# Run in a fresh interpreter where the train extra's packages and vse_train cannot be imported, as
# after `pip install d2s-bench` (d2s-vse without [train]): importing one fails, and transformers,
# which imports accelerate whenever it finds it, does not find it.
_WITHOUT_TRAIN = """
import io, json, sys
HIDDEN = {hidden!r}
for name in HIDDEN:
    sys.modules[name] = None  # "not installed": find_spec gives None, import raises ModuleNotFoundError
from PIL import Image
import bench
import bench.api
enc = bench.api.load_encoder({bundle!r})
images = []
for colour in ("red", "green", "blue"):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    images.append(buf.getvalue())
img = enc.embed_images(images, batch_size=2)
txt = enc.embed_texts(["a red square", "a green circle"], batch_size=1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN and sys.modules[m] is not None)
print(json.dumps({{"img": list(img.shape), "txt": list(txt.shape), "loaded": loaded}}))
"""


@pytest.mark.slow
def test_bench_embeds_with_a_bundle_without_the_train_extra(trained, tmp_path):
    """bench + bench.api load a real bundle and embed images and texts with neither the trainer
    (vse_train) nor its dependencies (accelerate, tensorboard, webdataset) importable, and d2s-vse
    requires those only through its ``train`` extra (it required them always before the split)."""
    from importlib.metadata import requires

    hard = [r for r in requires("d2s-vse") or [] if r.split(">")[0].split("=")[0].strip() in TRAIN_EXTRA]
    assert hard and all('extra == "train"' in r for r in hard), hard

    _, bundle = trained
    code = _WITHOUT_TRAIN.format(hidden=(*TRAIN_EXTRA, "vse_train"), bundle=str(bundle))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["img"][0] == 3 and out["txt"][0] == 2 and out["img"][1] == out["txt"][1] > 0
