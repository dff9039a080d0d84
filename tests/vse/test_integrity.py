"""Issue 19 in training: the shards' integrity index (d2s.integrity) is honoured by vse_train:
duplicates are skipped by the stream, and contaminated images warn or stop `vse train`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2s.integrity import Integrity
from d2s.schema import SampleError
from d2s.shards import iter_samples, split_shards
from tests.vse.forked_cli import run_cli
from tests.vse.test_train import cfg_doc
from vse_train.config import parse_config
from vse_train.data import image_id_int


@pytest.fixture(scope="module")
def contaminated(world, tmp_path_factory) -> tuple[Path, str, str]:
    """A copy of the world whose train split holds an image of an 'evaluation' folder, flagged by
    a real `densecap contamination` run (once for the module: the tests only read it). Returns
    (shards, shard name, key)."""
    tmp_path = tmp_path_factory.mktemp("contaminated")
    shards = tmp_path / "world"
    shutil.copytree(world, shards)
    first = split_shards(shards, "train")[0]
    s = next(iter_samples([first]))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "item7.png").write_bytes(s.image)
    r = subprocess.run(
        [sys.executable, "-m", "densecap.cli", "contamination", str(shards), "--against", f"folder:{bench}"]
        + ["--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return shards, Path(first).name, s.key


@pytest.mark.slow
def test_vse_train_refuses_contaminated_shards_with_error(contaminated, assets, tmp_path):
    shards, shard, key = contaminated
    doc = cfg_doc(shards, assets, tmp_path / "run", data={"contamination": "error"})
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `python -m vse_train.cli train --config CFG`, forked from a process that imported the trainer
    r = run_cli(["train", "--config", str(cfg)], tmp_path, env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.contamination: error" in r.stderr
    assert f"shard {shard}, key {key!r}" in r.stderr and "item 'item7.png'" in r.stderr
    assert not (tmp_path / "run" / "state").exists()  # refused before any step


def test_contaminated_shards_warn_by_default(contaminated, assets, tmp_path, caplog):
    from vse_train.build import check_integrity

    shards, shard, key = contaminated
    cfg = parse_config(cfg_doc(shards, assets, tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="vse_train.build"):
        integrity = check_integrity(cfg, split_shards(shards, "train"))
    assert (shard, key) in integrity.contaminated
    assert f"shard {shard}, key {key!r}" in caplog.text and "data.contamination: error refuses" in caplog.text
    urls = split_shards(shards, "train")
    with pytest.raises(SampleError, match="data.contamination: error"):
        check_integrity(parse_config(cfg_doc(shards, assets, tmp_path / "r2", data={"contamination": "error"})), urls)
    # only the shards trained on count: the flagged image's shard left out, no error
    check_integrity(parse_config(cfg_doc(shards, assets, tmp_path / "r2", data={"contamination": "error"})), urls[1:])
    # ignore: no warning, no error (the counts' INFO line stays)
    caplog.clear()
    check_integrity(parse_config(cfg_doc(shards, assets, tmp_path / "r3", data={"contamination": "ignore"})), urls)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in warned if "evaluation set" in m], warned


def test_shard_stream_skips_duplicate_images(world):
    from vse_train.data import Collate, ShardStream

    urls = split_shards(world, "train")
    dup = {(Path(u).name, s.key) for u in urls[:2] for s in iter_samples([u])}
    integrity = Integrity(duplicate_images={k: {} for k in dup})
    dup_ids = {image_id_int(s.id) for u in urls[:2] for s in iter_samples([u])}

    class Ids(Collate):  # only the ids: no image decoding needed to see which samples came
        def __init__(self):
            pass

        def __call__(self, samples, seed, chosen=None, shards=None):
            return [image_id_int(s.id) for s in samples]

    stream = ShardStream(urls, batch_size=32, collate=Ids(), shuffle_buffer=64, integrity=integrity)
    it = iter(stream)
    seen = [i for _ in range(16) for i in next(it)]  # 512 samples: two passes over what is left
    assert not dup_ids & set(seen)
    plain = iter(ShardStream(urls, batch_size=32, collate=Ids(), shuffle_buffer=64))
    assert dup_ids & {i for _ in range(16) for i in next(plain)}  # without the index they come
