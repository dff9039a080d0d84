"""Backbone pre-training (vse_train.backbone_pretrain): real tiny HF models trained on a real
``pretrain`` split.

One pre-training of tiny-vit (module fixture) is measured and checked from several sides; a
second run with the same params checks that it is bit-identical.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import vse_train.backbone_pretrain as bp
from d2s.config import ConfigError, from_dict
from d2s.schema import DenseText
from d2s.shards import ShardWriter, write_manifest
from d2s.synthetic import SplitSpec, WorldConfig, describe, make_sample, write_world
from vse.models import create_model
from vse_train.backbone_pretrain import BackbonePretrainParams, image_tags, label_vocab, pretrain_backbones

PRETRAIN = 480
# Small enough for a test, enough for the held-out figures to move well clear of the random init.
PARAMS = dict(
    image_steps=200,
    text_steps=100,
    batch_size=32,
    text_lr=3e-3,
    warmup_steps=10,
    min_label_count=3,
    holdout_fraction=0.1,
    seed=3,
)
SMALL = dict(PARAMS, image_steps=15, text_steps=15)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A train split (written by write_world) and a pretrain split with oracle dense texts; every
    seventh image also has a dropped dense text, which the MLM must not see."""
    out = tmp_path_factory.mktemp("pretrain_world")
    cfg = WorldConfig()
    write_world(out, cfg, [SplitSpec("train", 40)], shard_size=40, progress=False)
    for index, start in enumerate(range(0, PRETRAIN, 160)):
        with ShardWriter(out, "pretrain", index) as w:
            for i in range(start, start + 160):
                s = make_sample(cfg, "pretrain", i)
                s.dense = [DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")]
                if i % 7 == 0:
                    s.dense.append(DenseText("a a a a a", source="synthetic-oracle", verdict="repetition"))
                w.write(s)
    write_manifest(out)
    return out


@pytest.fixture(scope="module")
def run(assets, shards, tmp_path_factory):
    """Copies of the random assets, a pre-training in one, and the backbones as they left training."""
    random_dir = tmp_path_factory.mktemp("random_assets")
    pretrained_dir = tmp_path_factory.mktemp("pretrained_assets")
    shutil.copytree(assets, random_dir, dirs_exist_ok=True)
    shutil.copytree(assets, pretrained_dir, dirs_exist_ok=True)
    trained: dict[str, dict] = {}
    original = bp.save_backbone

    def capture(base_model, folder):
        trained[Path(folder).name] = _state(base_model)
        original(base_model, folder)

    torch.set_num_threads(1)
    bp.save_backbone = capture
    try:
        result = pretrain_backbones(
            pretrained_dir, shards, "tiny-vit", BackbonePretrainParams(**PARAMS), progress=False
        )
    finally:
        bp.save_backbone = original
    return {"random": random_dir, "pretrained": pretrained_dir, "result": result, "trained": trained}


@pytest.mark.slow
def test_heldout_metrics_improve_over_the_random_init(run):
    r = run["result"]
    img, txt = r["image"], r["text"]
    assert img["heldout_images"] == round(0.1 * PRETRAIN) and img["train_images"] == PRETRAIN - img["heldout_images"]
    b, a = img["heldout_before"], img["heldout_after"]
    assert a["map"] > b["map"] + 0.1, (b, a)
    assert a["micro_f1"] > b["micro_f1"], (b, a)
    b, a = txt["heldout_before"], txt["heldout_after"]
    assert a["mlm_accuracy"] > b["mlm_accuracy"] + 0.15 and a["mlm_loss"] < b["mlm_loss"], (b, a)
    assert img["loss"]["last10_mean"] < img["loss"]["first10_mean"]
    assert txt["loss"]["last10_mean"] < txt["loss"]["first10_mean"]
    # the MLM reads the sparse captions and the kept dense texts only (one per image, not the dropped ones)
    n_train = img["train_images"]
    assert txt["train_dense_texts"] == n_train and txt["train_texts"] == n_train * (
        WorldConfig().captions_per_image + 1
    )
    on_disk = json.loads((run["pretrained"] / "tiny-vit" / "backbone_pretrain.json").read_text())
    assert on_disk["params"] == {**BackbonePretrainParams().__dict__, **PARAMS}
    assert on_disk["image"]["steps"] == PARAMS["image_steps"] and on_disk["text"]["steps"] == PARAMS["text_steps"]
    assert on_disk["image"]["heldout_after"] == img["heldout_after"] and on_disk["trained"] == ["image", "text"]


@pytest.mark.slow
def test_saved_backbones_load_through_create_model_and_are_the_trained_ones(run):
    pretrained = create_model("tiny-vit", assets_dir=run["pretrained"])
    rand = create_model("tiny-vit", assets_dir=run["random"])
    for what, enc_w, enc_r in (("image", pretrained.image, rand.image), ("text", pretrained.text, rand.text)):
        loaded, random, trained = enc_w.backbone.state_dict(), enc_r.backbone.state_dict(), run["trained"][what]
        assert type(enc_w.backbone).__name__ == ("ViTModel" if what == "image" else "BertModel")
        assert set(loaded) == set(random) == set(trained)
        assert all(torch.equal(loaded[k], trained[k]) for k in loaded), what
        changed = [k for k in loaded if not torch.equal(loaded[k], random[k])]
        assert len(changed) > 0.9 * len(loaded), (what, sorted(set(loaded) - set(changed)))
    # same architecture config as the random backbones (no task head, no label names)
    for what in ("image", "text"):
        cfg_w = json.loads((run["pretrained"] / "tiny-vit" / what / "config.json").read_text())
        cfg_r = json.loads((run["random"] / "tiny-vit" / what / "config.json").read_text())
        assert cfg_w == cfg_r
    assert not list((run["pretrained"] / "tiny-vit").glob("*tmp*"))


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(assets, shards, tmp_path):
    dirs = {}
    for name, params in (("a", SMALL), ("b", SMALL), ("seed", dict(SMALL, seed=4))):
        dirs[name] = tmp_path / name
        shutil.copytree(assets, dirs[name])
        torch.manual_seed(ord(name[0]))  # the caller's RNG state must not matter
        pretrain_backbones(dirs[name], shards, "tiny-vit", BackbonePretrainParams(**params), progress=False)

    def weights(name, what):
        return (dirs[name] / "tiny-vit" / what / "model.safetensors").read_bytes()

    for what in ("image", "text"):
        assert weights("a", what) == weights("b", what), what
        assert weights("a", what) != weights("seed", what), what
    first, second = (json.loads((dirs[n] / "tiny-vit" / "backbone_pretrain.json").read_text()) for n in ("a", "b"))
    assert first["image"]["heldout_after"] == second["image"]["heldout_after"]
    assert first["text"]["loss"] == second["text"]["loss"]
    # a second pre-training on top of the first is refused
    with pytest.raises(ValueError, match="already pre-trained"):
        pretrain_backbones(dirs["a"], shards, "tiny-vit", BackbonePretrainParams(**SMALL), progress=False)


def test_missing_split_is_named_with_the_shards_dir_and_the_remedy(assets, shards, tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(assets, copy)
    with pytest.raises(FileNotFoundError) as exc:
        pretrain_backbones(copy, shards, "tiny-vit", BackbonePretrainParams(split="pretrian"), progress=False)
    msg = str(exc.value)
    assert "'pretrian'" in msg and str(shards) in msg and "pretrain: N" in msg and "'pretrain'" in msg
    # the CLI checks it before building anything and exits 2
    from vse_train.cli import main

    out = tmp_path / "cli_assets"
    assert (
        main(
            [
                "build-assets",
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--model",
                "tiny-vit",
                "--pretrain-split",
                "pretrian",
            ]
        )
        == 2
    )
    assert not out.exists()


def test_bad_params_name_the_field():
    for doc, field in (
        ({"image_steps": -1}, "image_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"lr": "fast"}, "lr"),
        ({"holdout_fraction": 0}, "holdout_fraction"),
        ({"max_label_fraction": 2}, "max_label_fraction"),
        ({"min_label_count": 0}, "min_label_count"),
        ({"text_lr": 0}, "text_lr"),
        ({"bogus": 1}, "bogus"),
    ):
        with pytest.raises(ConfigError, match=field):
            from_dict(BackbonePretrainParams, doc, "pretrain_backbones")
    from vse_train.stages import VseAssetsParams

    with pytest.raises(ConfigError, match=r"params\.pretrain_backbones.*text_steps"):
        from_dict(VseAssetsParams, {"pretrain_backbones": {"text_steps": "many"}}, "params")
    with pytest.raises(ConfigError, match="weight_decay"):
        from_dict(VseAssetsParams, {"pretrain_backbones": {"weight_decay": -0.1}}, "params")


def test_labels_are_caption_words_between_the_count_bounds():
    class S:
        def __init__(self, *caps):
            self.sparse = list(caps)

    tags = [
        image_tags(s) for s in (S("A red circle.", "a [MASK] square"), S("a red star"), S("a blue circle"), S("a mask"))
    ]
    assert tags[0] == {"a", "red", "circle", "square"}  # lower case, no punctuation, no special token
    assert tags[3] == {"a", "mask"}  # ... but the word itself is a word
    # "a" is on every image (above max 0.5); "square", "star", "blue" on one (below min 2)
    assert label_vocab(tags, 2, 0.5) == ["circle", "red"]
    assert label_vocab(tags, 1, 1.0) == ["a", "blue", "circle", "mask", "red", "square", "star"]


def test_vse_assets_stage_pretrains_the_backbones(shards, tmp_path):
    from d2s.pipeline import StageContext
    from vse_train.stages import VseAssetsParams, VseAssetsStage

    params = from_dict(
        VseAssetsParams,
        {
            "models": ["tiny-vit"],
            "pretrain_backbones": {"image_steps": 3, "text_steps": 3, "batch_size": 8, "min_label_count": 2},
        },
        "params",
    )
    out = tmp_path / "assets"
    ctx = StageContext(
        "assets",
        tmp_path,
        tmp_path / "work",
        params,
        {"shards": str(shards)},
        {"assets": out},
        logging.getLogger("test"),
    )
    result = VseAssetsStage().run(ctx)
    assert result["models"] == ["tiny-vit"]
    done = result["pretrain_backbones"]["tiny-vit"]
    assert done["image"]["steps"] == 3 and set(done["image"]["before"]) == {"map", "micro_f1"}
    assert done["text"]["steps"] == 3 and set(done["text"]["after"]) == {"mlm_accuracy"}
    assert json.loads((out / "tiny-vit" / "backbone_pretrain.json").read_text())["image"]["steps"] == 3
    assert not (tmp_path / "assets.tmp").exists()
    create_model("tiny-vit", assets_dir=out)  # loads
