"""Image sources on small real fixtures: PIL images, tars, a `datasets` dataset on disk."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from d2s.config import ConfigError
from d2s.shards import read_samples
from densecap.images import IMAGE_SOURCES, Rejected, check_image
from tests.densecap.conftest import png_bytes


def collect(source):
    samples, rejects = [], []
    for unit in source.units():
        for item in source.iter_unit(unit):
            (rejects if isinstance(item, Rejected) else samples).append((unit, item))
    return samples, rejects


def make(name, **params):
    return IMAGE_SOURCES.create(name, params, f"source {name}")


def test_check_image_reasons():
    assert check_image(png_bytes())[0] == "png"
    assert check_image(png_bytes(fmt="JPEG"))[0] == "jpg"
    assert "empty" in check_image(b"")[1]
    assert "magic" in check_image(b"hello world")[1]
    truncated = png_bytes(size=(64, 64))[:60]
    ext, reason = check_image(truncated)
    assert ext is None and "cannot decode" in reason


def test_folder_with_captions_and_chunks(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / ("sub" if i % 2 else "") / f"im{i}.png").write_bytes(png_bytes((i * 40, 0, 0)))
    (root / "notes.txt").write_text("not an image")
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\nim0.png,a red square\nsub/im1.png,a dark square\n")
    src = make("folder", path=str(root), captions=str(caps), chunk_size=2)
    units = src.units()
    assert [u.index for u in units] == [0, 1, 2] and [u.size for u in units] == [2, 2, 1]
    samples, rejects = collect(src)
    assert not rejects
    ids = sorted(s.id for _, s in samples)
    assert ids == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
    by_id = {s.id: s for _, s in samples}
    assert by_id["im0.png"].sparse == ["a red square"] and by_id["sub/im1.png"].sparse == ["a dark square"]
    assert by_id["im2.png"].sparse == []
    assert len({s.key for _, s in samples}) == 5


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        make("folder", path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown field"):
        make("folder", path=str(tmp_path), colour="red")
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(ConfigError, match="caps.jsonl:2"):
        make("folder", path=str(tmp_path), captions=str(bad))


def test_folder_captions_formats_share_the_import_reader(tmp_path):
    """The folder source's captions file is read by densecap.tables.read_table (the import source's
    reader): csv / tsv / jsonl / json / parquet, errors naming the file and line or column."""
    import pandas as pd

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (root / "b.png").write_bytes(png_bytes((0, 0, 200)))
    want = {"a.png": ["red"], "b.png": ["blue", "dark"]}
    files = {
        "c.tsv": "image\tcaption\na.png\tred\nb.png\tblue\nb.png\tdark\n",
        "c.jsonl": '{"image": "a.png", "caption": "red"}\n\n{"image": "b.png", "caption": ["blue", "dark"]}\n',
        "c.json": json.dumps({"a.png": "red", "b.png": ["blue", "dark"]}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    pd.DataFrame({"image": ["a.png", "b.png"], "caption": [["red"], ["blue", "dark"]]}).to_parquet(
        tmp_path / "c.parquet"
    )
    for name in [*files, "c.parquet"]:
        src = make("folder", path=str(root), captions=str(tmp_path / name))
        assert src.captions == want, name
    (tmp_path / "gap.jsonl").write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ConfigError, match=r"gap.jsonl:3: row lacks field 'image' or 'caption'"):
        make("folder", path=str(root), captions=str(tmp_path / "gap.jsonl"))
    (tmp_path / "cols.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(ConfigError, match=r"cols.csv: no column 'image'"):
        make("folder", path=str(root), captions=str(tmp_path / "cols.csv"))
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(ConfigError, match="unsupported table format '.txt'"):
        make("folder", path=str(root), captions=str(tmp_path / "c.txt"))


def test_karpathy(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        fn = f"COCO_val2014_{i:012d}.jpg"
        if i != 4:  # the last one is missing on disk
            (root / "val2014" / fn).write_bytes(png_bytes((0, i * 50, 0), fmt="JPEG"))
        images.append(
            {
                "filepath": "val2014",
                "filename": fn,
                "split": split,
                "cocoid": 100 + i,
                "imgid": i,
                "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b "}],
            }
        )
    kp = tmp_path / "dataset_coco.json"
    kp.write_text(json.dumps({"dataset": "coco", "images": images}))
    src = make("karpathy", path=str(kp), image_root=str(root))
    samples, rejects = collect(src)
    splits = {s.id: (u.split, s.split) for u, s in samples}
    assert splits == {
        "100": ("train", "train"),
        "101": ("train", "train"),
        "102": ("val", "val"),
        "103": ("test", "test"),
    }
    assert [r.id for _, r in rejects] == ["104"] and "unreadable" in rejects[0][1].reason
    s100 = next(s for _, s in samples if s.id == "100")
    assert s100.sparse == ["caption 0 a", "caption 0 b"] and s100.dataset == "coco" and s100.path.startswith("val2014/")
    only_test = make("karpathy", path=str(kp), image_root=str(root), splits=["test"])
    assert [u.split for u in only_test.units()] == ["test"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"filename": "x.jpg"}]}))
    with pytest.raises(ConfigError, match=r"images\[0\]"):
        make("karpathy", path=str(tmp_path / "bad.json"), image_root=str(root))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_img2dataset_tars(tmp_path):
    d = tmp_path / "laion"
    d.mkdir()
    for t in range(2):
        with tarfile.open(d / f"{t:05d}.tar", "w") as tf:
            for i in range(3):
                key = f"{t:05d}{i:04d}"
                _add(tf, f"{key}.jpg", png_bytes((t * 100, i * 60, 0), fmt="JPEG"))
                _add(tf, f"{key}.txt", f"caption {key}".encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}.jpg", "width": 40}).encode())
            _add(tf, "broken0001.json", json.dumps({"key": "broken0001"}).encode())  # no image member
    src = make("shards", path=str(d), split="train")
    units = src.units()
    assert [(u.split, u.index) for u in units] == [("train", 0), ("train", 1)]
    samples, rejects = collect(src)
    assert len(samples) == 6 and len(rejects) == 2 and all("no image member" in r.reason for _, r in rejects)
    s = samples[0][1]
    assert s.id == "000000000" and s.sparse == ["caption 000000000"] and s.path == "http://x/000000000.jpg"
    assert s.meta["width"] == "40"


def test_project_shards_keep_split_and_index(world_dir):
    src = make("synthetic-world", path=str(world_dir))
    units = src.units()
    assert sorted((u.split, u.index) for u in units) == [("train", 0), ("train", 1), ("train", 2), ("val", 0)]
    samples, rejects = collect(src)
    assert not rejects and len(samples) == 32
    assert all("scene" in s.meta and len(s.sparse) == 5 for _, s in samples)
    only_val = make("shards", path=str(world_dir), split="val")
    assert [(u.split, u.index) for u in only_val.units()] == [("val", 0)]


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")  # part of the dev install (densecap[hf])
    from PIL import Image

    imgs = [Image.new("RGB", (20, 20), (i * 50, 10, 10)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "caption": [f"cap {i}" for i in range(4)], "uid": [f"u{i}" for i in range(4)]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "uid": datasets.Value("string")}
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfds"))
    src = make(
        "hf", path=str(tmp_path / "hfds"), split="train", caption_column="caption", id_column="uid", chunk_size=3
    )
    assert [u.size for u in src.units()] == [3, 1]
    samples, rejects = collect(src)
    assert not rejects and [s.id for _, s in samples] == ["u0", "u1", "u2", "u3"]
    assert samples[2][1].sparse == ["cap 2"] and check_image(samples[2][1].image)[0] == "png"
    with pytest.raises(ConfigError, match="no split 'test'"):
        make("hf", path=str(tmp_path / "hfds"), split="test").units()
    with pytest.raises(ConfigError, match="no column 'img'"):
        make("hf", path=str(tmp_path / "hfds"), image_column="img").units()


def test_corrupt_images_are_recorded_and_skipped(tmp_path):
    """A run over a folder with broken files writes the good ones and a rejects jsonl with reasons."""
    from densecap.cli import main

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"ok{i}.png").write_bytes(png_bytes((i * 80, 0, 0)))
    (root / "truncated.png").write_bytes(png_bytes(size=(64, 64))[:70])
    (root / "text.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    # the import source gives every image the same long caption; no filters
    corpus = tmp_path / "dense.csv"
    corpus.write_text("id,text\n" + "".join(f"ok{i}.png,a picture number {i}\n" for i in range(3)))
    rc = main(
        [
            "run",
            "--source",
            "folder",
            "--input",
            str(root),
            "--caption-source",
            "import",
            "-C",
            f"path={corpus}",
            "--filters",
            "none",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    got = read_samples(out, "train")
    assert sorted(s.id for s in got) == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(s.dense[0].text.startswith("a picture number") for s in got)
    rejects = [json.loads(x) for x in (out / "report" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"truncated.png", "text.jpg"}
    assert "cannot decode" in reasons["truncated.png"] and "magic" in reasons["text.jpg"]
    stats = json.loads((out / "train-000000.stats.json").read_text())
    assert stats["images_rejected"] == 2 and stats["count"] == 3
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["images_rejected"] == 2
