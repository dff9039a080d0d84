"""Loaders of the published long-caption sets on fixture files in the publishers' formats
(tests/bench/fixtures/): a correct file, a truncated file and a missing image for each."""

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import bench.cli
import bench.stages
from bench.api import RetrievalSettings, embed_eval_set, evaluate_embeddings, read_results
from bench.data import DatasetError
from bench.datasets import (
    load_benchmark,
    load_dci,
    load_docci,
    load_iiw,
    load_sdci,
    load_sharegpt4v,
    load_urban1k,
    lotlip_text,
)
from d2s.retrieval import PROTOCOLS
from tests.bench.test_bench_cli import COLORS, ColorEncoder

FIXTURES = Path(__file__).parent / "fixtures"


def jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "JPEG")
    return buf.getvalue()


def fixture(tmp_path, name: str, images: dict[str, str]) -> Path:
    """Copy a fixture folder and write its images (path relative to the copy -> colour name)."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    for rel, colour in images.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg(COLORS[colour]))
    return root


def truncate(path: Path, keep: float = 0.6) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


URBAN = {"Urban1k/image/1.jpg": "red", "Urban1k/image/2.jpg": "green", "Urban1k/image/3.jpg": "blue"}
DOCCI = {"images/test_00001.jpg": "red", "images/test_00003.jpg": "green", "images/test_00005.jpg": "blue"}
DCI = {
    f"densely_captioned_images/photos/sa_{k}.jpg": c
    for k, c in (("1545038", "red"), ("1545118", "green"), ("1545173", "blue"))
}
SHARE = {"sam/images/sa_10.jpg": "red", "sam/images/sa_11.jpg": "green", "sam/images/sa_12.jpg": "blue"}


def test_lotlip_text_rule():
    assert lotlip_text("A red car.\n\nIt is parked. </s>") == "A red car. It is parked"
    assert lotlip_text("one.two") == "one. two"


# ------------------------------------------------------------------------------- Urban1k
def test_urban1k(tmp_path):
    root = fixture(tmp_path, "urban1k", URBAN)
    data = load_urban1k(root, count=None)
    assert data.image_ids == ["1", "2", "3"] and list(data.txt_to_img) == [0, 1, 2]
    assert data.captions[1].startswith("An aerial view of a park") and data.images[2].endswith("Urban1k/image/3.jpg")
    assert set(data.provenance["files"]) == {"caption/1.txt", "caption/2.txt", "caption/3.txt"}
    r = evaluate_embeddings(embed_eval_set(ColorEncoder(), data), RetrievalSettings(long_text=False, bootstrap=0))
    assert r["custom"].metrics.rsum == 600
    with pytest.raises(DatasetError, match=r"found 3 caption files, the protocol needs 1000"):
        load_urban1k(root)


def test_urban1k_truncated_and_missing_image(tmp_path):
    root = fixture(tmp_path, "urban1k", URBAN)
    (root / "Urban1k/caption/2.txt").write_text("")
    with pytest.raises(DatasetError, match=r"caption/2\.txt: empty caption file"):
        load_urban1k(root, count=None)
    root = fixture(tmp_path / "b", "urban1k", {k: v for k, v in URBAN.items() if "3.jpg" not in k})
    with pytest.raises(DatasetError, match=r"image file .*Urban1k/image/3\.jpg not found \(1 of 3 missing\)"):
        load_urban1k(root, count=None)


# ------------------------------------------------------------------------------- DOCCI
def test_docci(tmp_path):
    root = fixture(tmp_path, "docci", DOCCI)
    data = load_docci(root, count=None)
    assert data.image_ids == ["test_00001", "test_00003", "test_00005"]  # the test split only, file order
    assert data.captions[0].startswith("A red ceramic mug") and len(data.provenance["files"]) == 1
    with pytest.raises(DatasetError, match="found 3 entries, the protocol needs 5000"):
        load_docci(root)
    with pytest.raises(
        DatasetError, match=r"no entries with split 'val'; splits present: \['qual_dev', 'test', 'train'\]"
    ):
        load_docci(root, split="val", count=None)


def test_docci_truncated_and_missing_image(tmp_path):
    root = fixture(tmp_path, "docci", DOCCI)
    truncate(root / "docci_descriptions.jsonlines")
    with pytest.raises(DatasetError, match=r"docci_descriptions\.jsonlines:\d+: not a JSON object, truncated line"):
        load_docci(root, count=None)
    root = fixture(tmp_path / "b", "docci", {k: v for k, v in DOCCI.items() if "00003" not in k})
    with pytest.raises(DatasetError, match=r"image file .*images/test_00003\.jpg not found"):
        load_docci(root, count=None)


# ------------------------------------------------------------------------------- IIW
IIW_IMAGES = {
    "docci/images/test_00731.jpg": "green",
    "docci/images_aar/aar_test_04600.jpg": "red",
    "docci/images_aar/aar_test_04601.jpg": "white",
    "dci/densely_captioned_images/photos/sa_1545038.jpg": "blue",
}


def iiw_roots(tmp_path, images=IIW_IMAGES):
    root = fixture(tmp_path, "imageinwords", {})
    for rel, colour in images.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg(COLORS[colour]))
    (tmp_path / "docci").mkdir(exist_ok=True)
    (tmp_path / "dci" / "densely_captioned_images").mkdir(parents=True, exist_ok=True)
    return root, tmp_path / "docci", tmp_path / "dci"


def test_iiw(tmp_path):
    root, docci, dci = iiw_roots(tmp_path)
    data = load_iiw(root, docci, dci, count=None)
    # LoTLIP's order: DOCCI_Test, IIW-400, DCI_Test
    assert data.image_ids == [
        "DOCCI_Test/test_00731.jpg",
        "IIW-400/aar_test_04600.jpg",
        "IIW-400/aar_test_04601.jpg",
        "DCI_Test/sa_1545038.jpg",
    ]
    assert data.images[1].endswith("docci/images_aar/aar_test_04600.jpg")
    assert data.captions[1] == (
        "A close-up outdoor shot shows a red tulip in front of a hazy garden. The petals are smooth and "
        "slightly open. The stem is thin and leans to the left"
    )
    r = evaluate_embeddings(embed_eval_set(ColorEncoder(), data), RetrievalSettings(long_text=False, bootstrap=0))
    assert r["custom"].metrics.i2t_r1 == 100
    with pytest.raises(DatasetError, match="found 4 records, the protocol needs 612"):
        load_iiw(root, docci, dci)


def test_iiw_truncated_and_missing_image(tmp_path):
    root, docci, dci = iiw_roots(tmp_path)
    truncate(root / "IIW-400" / "data.jsonl", 0.8)
    with pytest.raises(DatasetError, match=r"IIW-400/data\.jsonl:2: not a JSON object, truncated line"):
        load_iiw(root, docci, dci, count=None)
    root, docci, dci = iiw_roots(tmp_path / "b", {k: v for k, v in IIW_IMAGES.items() if "sa_" not in k})
    with pytest.raises(DatasetError, match=r"image file .*photos/sa_1545038\.jpg not found"):
        load_iiw(root, docci, dci, count=None)


# ------------------------------------------------------------------------------- DCI / sDCI
def test_dci_and_sdci(tmp_path):
    root = fixture(tmp_path, "dci", DCI)
    data = load_dci(root, count=None)
    assert data.image_ids == ["113029-data.json", "113106-data.json", "113159-data.json"]  # train, valid, test
    assert data.captions[0] == (
        "A red brick house with a garden. The house has two floors and a slate roof. A wooden fence runs along "
        "the front of the garden. Roses grow beside the door"
    )
    s = load_sdci(root, count=None)
    assert s.captions == [
        "A red house behind a wooden fence with roses.",
        "Cows in a green field by a stone wall.",
        "A small blue hatchback parked by a meter.",
    ]
    assert s.images == data.images and "complete/113029-data.json" in s.provenance["files"]
    r = evaluate_embeddings(embed_eval_set(ColorEncoder(), data), RetrievalSettings(long_text=False, bootstrap=0))
    assert r["custom"].metrics.rsum == 600
    with pytest.raises(DatasetError, match="found 3 annotations, the protocol needs 7805"):
        load_dci(root)


def test_dci_truncated_missing_field_and_missing_image(tmp_path):
    root = fixture(tmp_path, "dci", DCI)
    truncate(root / "densely_captioned_images/annotations/113106-data.json")
    with pytest.raises(DatasetError, match=r"annotations/113106-data\.json: not valid JSON, truncated or damaged"):
        load_dci(root, count=None)
    truncate(root / "densely_captioned_images/splits.json")
    with pytest.raises(DatasetError, match=r"splits\.json: not valid JSON"):
        load_sdci(root, count=None)
    root = fixture(tmp_path / "b", "dci", DCI)
    f = root / "densely_captioned_images/complete/113159-data.json"
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "summaries"}))
    with pytest.raises(DatasetError, match=r"complete/113159-data\.json: missing field 'summaries'"):
        load_sdci(root, count=None)
    root = fixture(tmp_path / "c", "dci", {k: v for k, v in DCI.items() if "1545118" not in k})
    with pytest.raises(DatasetError, match=r"image file .*photos/sa_1545118\.jpg not found"):
        load_dci(root, count=None)
    with pytest.raises(DatasetError, match=r"sdci: image file .*photos/sa_1545118\.jpg not found"):
        load_sdci(root, count=None)


# ------------------------------------------------------------------------------- ShareGPT4V
def test_sharegpt4v_cut_from_the_sharecaptioner_file(tmp_path):
    root = fixture(tmp_path, "sharegpt4v", SHARE)
    data = load_sharegpt4v(root, 3)
    assert data.image_ids == ["sa_10", "sa_11", "sa_12"]  # COCO and LLaVA entries skipped, file order kept
    assert data.captions[0] == (
        "The image shows a red umbrella open on a beach. The sand is pale and the sea is calm behind it. "
        "A towel lies beside the umbrella"
    )
    assert load_sharegpt4v(root, 2).image_ids == ["sa_10", "sa_11"]  # the first n SA-1B entries
    with pytest.raises(DatasetError, match="found 3 SA-1B entries, the protocol needs 1000"):
        load_benchmark("sharegpt4v_1k", {"root": root})


def test_sharegpt4v_longclip_cut_takes_the_first_entries_of_any_source(tmp_path):
    images = {
        **SHARE,
        "coco/train2017/000000000009.jpg": "white",
        "llava/llava_pretrain/images/00000/000000010.jpg": "black",
    }
    root = fixture(tmp_path, "sharegpt4v", images)
    data = load_sharegpt4v(root, 4, cut="longclip")
    assert data.image_ids == ["000000000009", "sa_10", "sa_11", "llava_1"]
    assert data.captions[0] == "A lunch box with food.  It holds rice and broccoli."  # newlines -> spaces, as Long-CLIP
    assert data.provenance["cut"] == "longclip"
    with pytest.raises(DatasetError, match="found 5 entries, the protocol needs 1000"):
        load_benchmark("sharegpt4v_1k_longclip", {"root": root})
    # the two cuts of "ShareGPT4V-1k" are different sets: a manifest tells them apart
    assert PROTOCOLS.get("sharegpt4v_1k").subset != PROTOCOLS.get("sharegpt4v_1k_longclip").subset


def test_sharegpt4v_sa1b_layout_truncated_and_missing_image(tmp_path):
    # SA-1B's own layout (sa_000000/images/sa_10.jpg): found by file name under the root
    root = fixture(tmp_path, "sharegpt4v", {k.replace("sam/images", "sa_000000/images"): v for k, v in SHARE.items()})
    assert load_sharegpt4v(root, 3).images[2].endswith("sa_000000/images/sa_12.jpg")
    truncate(root / "share-captioner_coco_lcs_sam_1246k_1107.json")
    with pytest.raises(DatasetError, match=r"share-captioner_coco_lcs_sam_1246k_1107\.json: not valid JSON"):
        load_sharegpt4v(root, 3)
    root = fixture(tmp_path / "b", "sharegpt4v", {k: v for k, v in SHARE.items() if "sa_11" not in k})
    with pytest.raises(DatasetError, match=r"image file .*sam/images/sa_11\.jpg not found"):
        load_sharegpt4v(root, 3)


def test_every_benchmark_has_a_registered_long_caption_protocol():
    from bench.datasets import BENCHMARKS

    for name in BENCHMARKS.names():
        p = PROTOCOLS.get(BENCHMARKS.get(name).protocol)
        assert p.one_text_per_image and p.n_images and p.subset and p.texts and p.reproduces, name
    with pytest.raises(DatasetError, match=r"needs directories for \['docci_root', 'dci_root'\]"):
        load_benchmark("iiw", {"root": "x"})


# ------------------------------------------------------------------------------- end to end, full size
def urban1k_full(tmp_path) -> Path:
    """Urban1k at its published size (1,000 pairs), in its layout, with colour-coded texts."""
    root = tmp_path / "u1k" / "Urban1k"
    (root / "caption").mkdir(parents=True)
    (root / "image").mkdir()
    names = list(COLORS)
    for n in range(1, 1001):
        c = names[n % len(names)]
        (root / "caption" / f"{n}.txt").write_text(f"A street scene where most things are {c}.\nsecond line\n")
        (root / "image" / f"{n}.jpg").write_bytes(jpeg(COLORS[c]))
    return tmp_path / "u1k"


def test_urban1k_protocol_through_cli_and_stage(tmp_path, monkeypatch, capsys):
    root = urban1k_full(tmp_path)
    monkeypatch.setattr(bench.cli, "load_encoder", lambda path, device=None: ColorEncoder())
    monkeypatch.setattr(bench.stages, "load_encoder", lambda path, device=None: ColorEncoder())
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "model.safetensors").write_bytes(b"stand-in")
    out = tmp_path / "res"
    argv = ["retrieval", "--bundle", str(tmp_path / "bundle"), "--benchmark", "urban1k", "--data-root", str(root)]
    assert bench.cli.main([*argv, "--bootstrap", "200", "--out", str(out)]) == 0
    r = read_results(out)
    assert set(r.benchmarks) == {"urban1k"}  # no sparse or long_text extras
    u = r.benchmarks["urban1k"]
    assert (u.n_images, u.n_texts) == (1000, 1000)
    # 5 colours x 200 images each: image -> text R@1 is the share of images that win the stable tie
    assert u.metrics.i2t_r1 == pytest.approx(100 * 5 / 1000) and u.metrics.i2t_r10 == pytest.approx(100 * 50 / 1000)
    m = u.manifest
    assert m["protocol"]["name"] == "urban1k" and m["protocol"]["pairs"]["captions_per_image"] == "1"
    assert "Long-CLIP" in m["protocol"]["reproduces"] and m["model"]["sha256"] and len(m["data"]["files"]) == 1000
    # 5 distinct texts over 1,000 captions; 1,000 distinct image files (equal pixels, other names)
    assert m["data"]["duplicates"] == {"texts": 995, "images": 0}
    assert u.intervals["i2t_r10"][0] <= 5.0 <= u.intervals["i2t_r10"][1]
    assert bench.cli.main([*argv, "--protocol", "coco_5k", "--out", str(tmp_path / "x")]) == 2
    assert "brings its own protocol" in capsys.readouterr().err

    from d2s.pipeline import Runner, load_pipeline

    doc = {
        "stages": {
            "urban": {
                "type": "bench-retrieval",
                "params": {"benchmark": "urban1k", "bootstrap": 200},
                "inputs": {"bundle": str(tmp_path / "bundle"), "data": str(root)},
            }
        }
    }
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    Runner(p).run()
    staged = read_results(p.stage("urban").outputs["results"]).benchmarks["urban1k"]
    assert staged.metrics == u.metrics and staged.manifest["data"] == u.manifest["data"]


def test_roots_missing_local_or_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"nowhere: no such directory"):
        load_urban1k(tmp_path / "nowhere")
    # offline with an empty cache (tests never download): the hub path fails as one clear error
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DatasetError, match=r"hf://BeichenZhang/Urban1k: cannot fetch the hub dataset"):
        load_benchmark("urban1k", {})


def test_bench_protocols_lists_subset_text_rule_and_table(capsys):
    assert bench.cli.main(["protocols"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "| urban1k | 1000 | 1 | all 1,000 pairs of Urban1k" in rows["urban1k"] and "Long-CLIP" in rows["urban1k"]
    assert "| iiw | 612 |" in rows["iiw"] and "LoTLIP" in rows["iiw"]
    assert rows["coco_1k_5fold"].startswith("| coco_1k_5fold |  | 5000 | 5 |")
