import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from d2s.schema import DenseText, Sample, SampleError
from d2s.shards import (
    ShardWriter,
    completed_shards,
    iter_samples,
    read_manifest,
    remove_incomplete,
    split_shards,
    split_size,
    write_manifest,
)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value % 256, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value % 256, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make(i: int, split="train", dense_params=None) -> Sample:
    ext, data = ("png", png(i)) if i % 2 else ("jpg", jpg(i))
    dense = [
        DenseText(
            text=f"dense {i}", source="oracle", params=dense_params or {"temperature": 0.2}, scores={"words": 2.0}
        ),
        DenseText(text="I'm sorry", source="vlm", model="m", verdict="refusal"),
    ]
    return Sample(
        key=f"k{i:04d}",
        image=data,
        image_ext=ext,
        id=f"img{i}",
        dataset="t",
        split=split,
        path=f"/x/{i}.{ext}",
        sparse=[f"cap {i} {j}" for j in range(5)],
        dense=dense,
        meta={"a": str(i)},
    )


def write_dataset(d, n_shards=2, per=3, split="train"):
    for s in range(n_shards):
        with ShardWriter(d, split, s) as w:
            for i in range(s * per, (s + 1) * per):
                w.write(make(i, split))
    return write_manifest(d)


def test_round_trip_preserves_everything(tmp_path):
    write_dataset(tmp_path)
    got = list(iter_samples(split_shards(tmp_path, "train")))
    want = [make(i) for i in range(6)]
    assert got == want  # dataclass equality: image bytes untouched, dense records, meta
    assert [d.kept for d in got[0].dense] == [True, False]
    assert split_size(tmp_path, "train") == 6
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 3, "train-000001.tar": 3}


def test_plain_webdataset_pipeline_reads_shards(tmp_path):
    import webdataset as wds

    write_dataset(tmp_path)
    ds = wds.WebDataset(split_shards(tmp_path, "train"), shardshuffle=False).decode("pil")
    rows = list(ds)
    assert len(rows) == 6
    assert rows[1]["png"].size == (6, 6) and rows[0]["jpg"].size == (6, 6)
    assert rows[2]["json"]["sparse"][0] == "cap 2 0"


def test_hf_datasets_reads_shards(tmp_path):
    import datasets

    # dense params with different keys in different samples must still load as one table
    # mixed jpg/png input: the writer's image_ext makes one member type per split
    for s, params in enumerate([{"temperature": 0.2}, {"top_p": 0.9, "seed": 1.0}]):
        with ShardWriter(tmp_path, "train", s, image_ext="png") as w:
            for i in range(3):
                w.write(make(s * 3 + i, dense_params=params))
    write_manifest(tmp_path)
    ds = datasets.load_dataset("webdataset", data_files={"train": str(tmp_path / "train-*.tar")}, split="train")
    assert ds.num_rows == 6
    keys = sorted(ds["__key__"])
    assert keys == [f"k{i:04d}" for i in range(6)]
    row = ds[[k for k in ds["__key__"]].index("k0003")]
    assert row["json"]["id"] == "img3" and row["json"]["dense"][0]["text"] == "dense 3"
    assert np.asarray(row["png"]).shape == (6, 6, 3)
    originals = {r["id"]: r["meta"].get("original_format") for r in ds["json"]}
    assert originals["img3"] is None and originals["img2"] == "jpg"
    png_kept = next(s for s in iter_samples(split_shards(tmp_path, "train")) if s.id == "img3")
    assert png_kept.image == make(3).image  # same-format images are stored byte for byte


def test_exception_inside_writer_leaves_nothing_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", 0) as w:
            w.write(make(0))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert completed_shards(tmp_path) == {}


def test_tar_without_stats_is_incomplete_and_removed(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    (tmp_path / "train-000000.stats.json").unlink()
    assert completed_shards(tmp_path) == {}
    assert remove_incomplete(tmp_path) == ["train-000000.tar"]


def test_truncated_tar_with_stale_stats_is_incomplete(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    tar = tmp_path / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:1024])
    assert completed_shards(tmp_path) == {}


@pytest.mark.slow
def test_sigkill_during_write_never_looks_complete(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_shards import make
        from d2s.shards import ShardWriter
        with ShardWriter({str(tmp_path)!r}, "train", 0) as w:
            for i in range(10**6):
                w.write(make(i))
                if i == 20:
                    print("writing", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar.tmp"]
    assert completed_shards(tmp_path) == {}
    remove_incomplete(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _write_raw(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "members, message",
    [
        (
            [("a.json", json.dumps(make(1).json_dict()).encode())],
            r"shard .*bad.tar, key 'a': missing image member '.png'",
        ),
        ([("a.png", png(1)), ("a.json", b"{not json")], r"key 'a': malformed json member"),
        (
            [("a.png", png(1)), ("a.json", json.dumps({**make(1).json_dict(), "schema_version": 99}).encode())],
            r"key 'a': unknown schema_version 99",
        ),
        (
            [("a.png", png(1)), ("a.json", json.dumps({**make(1).json_dict(), "sparse": "one"}).encode())],
            r"key 'a': json field 'sparse' missing or not a list",
        ),
        ([("a.png", png(1))], r"key 'a': missing json member"),
    ],
)
def test_bad_samples_name_shard_and_key(tmp_path, members, message):
    path = tmp_path / "bad.tar"
    _write_raw(path, members)
    with pytest.raises(SampleError, match=message):
        list(iter_samples([path]))


def test_writer_rejects_bad_keys_and_duplicates(tmp_path):
    with ShardWriter(tmp_path, "train", 0) as w:
        with pytest.raises(SampleError, match="duplicate key"):
            w.write(make(1))
            w.write(make(1))
        bad = make(2)
        bad.key = "has.dot"
        with pytest.raises(SampleError, match="keys must be"):
            w.write(bad)


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(tmp_path)
    write_dataset(tmp_path, n_shards=1)
    with pytest.raises(KeyError, match="no split 'val'; splits present: \\['train'\\]"):
        split_shards(tmp_path, "val")


def _read_under_distributed(rank, world, init, root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        keys = [s.key for s in iter_samples(split_shards(root, "train"))]
        (out / f"rank{rank}.json").write_text(json.dumps(keys))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_plain_reader_reads_every_shard_while_torch_distributed_is_up(tmp_path):
    import torch.multiprocessing as mp

    data = tmp_path / "data"
    write_dataset(data, n_shards=3, per=2)
    init = f"file://{tmp_path / 'dist-init'}"
    mp.spawn(_read_under_distributed, args=(2, init, data, tmp_path), nprocs=2, join=True)
    want = [f"k{i:04d}" for i in range(6)]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == want


def test_shards_have_plain_ustar_headers(tmp_path):
    """No PAX extended header per member (a float mtime would add one): half the headers to
    parse for every reader, and a third less bytes for small images."""
    write_dataset(tmp_path, n_shards=1, per=3)
    with tarfile.open(tmp_path / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert len(members) == 6
    for m in members:
        assert m.pax_headers == {}, (m.name, m.pax_headers)
        assert isinstance(m.mtime, int) and abs(m.mtime - time.time()) < 600
