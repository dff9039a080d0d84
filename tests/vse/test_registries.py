"""vse's model configs, recipes and losses live in d2s.registry registries (one plug-in mechanism)."""

import json

import pytest

from d2s.config import ConfigError
from d2s.registry import Registry
from vse.models import MODELS, get_model_config, list_models
from vse_train.losses import LOSSES, build_loss
from vse_train.recipes import RECIPES, get_recipe


def test_registries_are_the_core_registry():
    assert all(isinstance(r, Registry) for r in (MODELS, RECIPES, LOSSES))
    assert {"tiny-vit", "vit-b16-224-bert-base"} <= set(list_models())
    assert {
        "stage1",
        "stage2",
        "baseline",
        "pretrain-align",
        "align-distill",
        "stage2-head-only",
        "stage2-distill-only",
    } <= set(RECIPES.names())
    assert {"triplet", "infonce", "distill"} <= set(LOSSES)


def test_a_user_folder_adds_a_model_config_and_a_recipe(tmp_path):
    doc = json.loads((MODELS.json_files()["tiny-vit"]).read_text())
    doc["embed_dim"] = 64
    (tmp_path / "my-tiny.json").write_text(json.dumps(doc))
    recipe = json.loads(RECIPES.json_files()["stage2"].read_text())
    recipe["description"] = "mine"
    (tmp_path / "my-stage2.json").write_text(json.dumps(recipe))
    MODELS.add_json_folder(tmp_path)
    RECIPES.add_json_folder(tmp_path)
    assert get_model_config("my-tiny").embed_dim == 64
    assert get_model_config("tiny-vit").embed_dim != 64  # the packaged one is untouched
    assert get_recipe("my-stage2").name == "my-stage2"
    # the registry caches parsed files: overrides must not leak into the next lookup
    assert get_model_config("my-tiny", embed_dim=32).embed_dim == 32
    assert get_model_config("my-tiny").embed_dim == 64


def test_unknown_names_fail_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"model: unknown model config 'nope'; registered: \[.*tiny-vit"):
        get_model_config("nope")
    with pytest.raises(ConfigError, match=r"recipe: unknown recipe 'nope'; registered: \[.*stage2"):
        get_recipe("nope")
    with pytest.raises(ConfigError, match=r"recipe.losses\[0\].kind: unknown loss 'hinge'; registered: \[.*triplet"):
        build_loss("hinge", {}, 10, "recipe.losses[0]")
