"""Shared fixtures: a small synthetic world written as real shards, with the oracle dense text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2s.schema import DenseText
from d2s.shards import ShardWriter, write_manifest
from d2s.synthetic import SplitSpec, WorldConfig, describe, iter_world


def write_world_with_dense(out: Path, train: int = 512, val: int = 64, shard_size: int = 128, seed: int = 0) -> Path:
    cfg = WorldConfig(world_seed=seed)
    for spec in (SplitSpec("train", train, seed), SplitSpec("val", val, seed)):
        samples = list(iter_world(cfg, spec))
        for index, start in enumerate(range(0, len(samples), shard_size)):
            with ShardWriter(out, spec.name, index) as w:
                for s in samples[start : start + shard_size]:
                    s.dense = [DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")]
                    w.write(s)
    write_manifest(out)
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return write_world_with_dense(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def assets(world, tmp_path_factory) -> Path:
    from vse.assets import build_assets

    out = tmp_path_factory.mktemp("assets")
    build_assets(world, out, ["tiny-vit"])
    return out


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
