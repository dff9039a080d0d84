"""Renaming 'captioners' to 'caption_sources' (config key, CLI, package) changes no fingerprint.

The shard fingerprint (``config_hash``) and the pipeline stage's cache key decide whether
finished shards are kept: a config written with the old key, or with the new one, must give
the very hashes the code gave before the rename, or every user's shards would be captioned
again. The pinned values were computed with the code before the rename (commit a9efcfe) on
pipelines/quickstart.yaml, then written with ``captioners:``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from d2s.config import ConfigError, from_dict
from d2s.pipeline import Runner, load_pipeline

REPO = Path(__file__).resolve().parents[2]
PIN_RUN_DIR = "/d2s-fingerprint-pin/run"
# computed by the code before the rename (a9efcfe), run_dir=PIN_RUN_DIR
PINNED = {
    "stage_hash": "4934466a4c94fd9f",
    "stage_params_hash": "dcb07a465d693153",
    "shard_config_hash": "653c5a4a30297c2b",
}


def quickstart_doc(key: str) -> dict:
    doc = yaml.safe_load((REPO / "pipelines" / "quickstart.yaml").read_text())
    params = doc["stages"]["captions"]["params"]
    params[key] = params.pop("caption_sources")
    return doc


def hashes(doc: dict) -> dict[str, str]:
    from densecap.config import PluginConfig
    from densecap.run import config_fingerprint

    p = load_pipeline(doc=copy.deepcopy(doc), run_dir=PIN_RUN_DIR)
    r = Runner(p)
    r.run(dry_run=True, until="captions")
    cfg = p.stage("captions").params.config
    src = cfg.source
    shards = str(p.stage("world").outputs["shards"])
    shard_cfg = dataclasses.replace(cfg, source=PluginConfig(src.type, {**src.params, "path": shards}, src.label))
    return {
        "stage_hash": r.hashes["captions"],
        "stage_params_hash": config_fingerprint(cfg),
        "shard_config_hash": config_fingerprint(shard_cfg),
    }


@pytest.mark.parametrize("key", ["caption_sources", "captioners"])
def test_quickstart_hashes_are_those_before_the_rename(key, caplog):
    with caplog.at_level(logging.WARNING):
        assert hashes(quickstart_doc(key)) == PINNED
    assert ("'captioners' is deprecated" in caplog.text) is (key == "captioners")


def test_old_and_new_key_give_the_same_fingerprint_and_cache_key():
    from densecap.config import RunConfig
    from densecap.run import config_fingerprint
    from densecap.stage import DensecapStage

    sources = [{"type": "vllm-server", "params": {"base_url": "http://h:8000/v1", "model": "m", "concurrency": 3}}]
    common = {"out": "x", "source": {"type": "shards", "params": {"path": "p"}}}
    old = from_dict(RunConfig, {**common, "captioners": sources})
    new = from_dict(RunConfig, {**common, "caption_sources": sources})
    assert old == new and config_fingerprint(old) == config_fingerprint(new)
    key_old = DensecapStage.cache_params({"captioners": sources, "rank": 0})
    key_new = DensecapStage.cache_params({"caption_sources": sources, "rank": 0})
    # the key keeps the old name, without the transport params
    assert key_old == key_new == {"captioners": [{"type": "vllm-server", "params": {"model": "m"}}]}


def test_both_keys_is_an_error():
    from densecap.config import DensecapConfig

    with pytest.raises(ConfigError, match="'captioners' is the deprecated name of 'caption_sources'"):
        from_dict(DensecapConfig, {"captioners": [], "caption_sources": []})


def test_cli_keeps_the_old_names(world_dir, tmp_path, capsys, caplog):
    from densecap.cli import main

    assert main(["captioners"]) == 0 and "synthetic-oracle:" in capsys.readouterr().out
    assert main(["caption-sources"]) == 0 and "synthetic-oracle:" in capsys.readouterr().out
    cfg = tmp_path / "old.yaml"
    cfg.write_text(
        f"source: {{type: shards, params: {{path: {world_dir}}}}}\ncaptioners: [{{type: synthetic-oracle}}]\n"
    )
    base = ["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--print-config"]
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert '"caption_sources"' in printed and '"captioners"' not in printed
    assert "'captioners' is deprecated" in caplog.text
    assert main([*base, "--captioner", "synthetic-oracle=a", "--set", "captioners.0.label=b"]) == 0
    assert '"label": "b"' in capsys.readouterr().out


def test_old_package_name_is_the_same_module():
    import densecap.caption_sources as new
    import densecap.caption_sources.vllm_server as new_vs
    import densecap.captioners as old
    from densecap.captioners.vllm_server import VLLMServerSource

    assert old.CAPTION_SOURCES is new.CAPTION_SOURCES and old.CaptionSource is new.CaptionSource
    assert VLLMServerSource is new_vs.VLLMServerSource and old.vllm_server is new_vs


def test_stage_params_list_the_wrapped_config_fields():
    from d2s.config import flat_fields, known_fields, to_dict
    from densecap.config import DensecapConfig, RunConfig, StageConfig

    inner = [f.name for f in flat_fields(DensecapConfig)]
    assert [f.name for f in flat_fields(StageConfig)] == [*inner, "rank", "world_size"]
    assert known_fields(RunConfig) == [*inner, "rank", "world_size", "out", "report"]
    assert list(to_dict(from_dict(RunConfig, {"out": "o"}))) == known_fields(RunConfig)  # flat, same order
