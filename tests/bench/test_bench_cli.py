"""bench CLI, Python API, data loaders and the bench-retrieval stage, end to end on tiny real files."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bench.stages
from bench.api import BenchResults, Embeddings, RetrievalSettings, embed_eval_set, evaluate_embeddings, read_results
from bench.cli import main
from bench.data import DatasetError, load_karpathy, load_shards
from d2s.retrieval import retrieval_metrics
from d2s.schema import DenseText, Sample
from d2s.shards import ShardWriter, write_manifest

torch.set_num_threads(1)
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "PNG")
    return buf.getvalue()


class ColorEncoder:
    """Stand-in for vse.bundle.Bundle (same two methods): mean colour vs colour words."""

    def embed_images(self, images, batch_size=64):
        out = []
        for im in images:
            arr = np.asarray(Image.open(io.BytesIO(im)).convert("RGB"), np.float32).mean((0, 1)) / 255
            out.append([*arr, 1 - arr.mean()])
        return torch.nn.functional.normalize(torch.tensor(out) + 1e-3, dim=1)

    def embed_texts(self, texts, batch_size=256):
        out = []
        for t in texts:
            v = torch.full((4,), 1e-3)
            for name, rgb in COLORS.items():
                if name in t:
                    v += torch.tensor([*(np.array(rgb) / 255), 1 - np.mean(rgb) / 255], dtype=torch.float32)
            out.append(v)
        return torch.nn.functional.normalize(torch.stack(out), dim=1)


def write_saved(tmp_path, seed=0, n=30, per=5):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 16)).astype(np.float32)
    txt = (np.repeat(img, per, axis=0) + rng.normal(scale=1.5, size=(n * per, 16))).astype(np.float32)
    np.save(tmp_path / f"img{seed}.npy", img)
    np.save(tmp_path / f"txt{seed}.npy", txt)
    (tmp_path / f"map{seed}.json").write_text(json.dumps([j // per for j in range(n * per)]))
    return img, txt


@pytest.mark.slow
def test_cli_saved_embeddings_json_markdown_and_compare_png(tmp_path, capsys):
    img, txt = write_saved(tmp_path, 0)
    out = tmp_path / "run0"
    rc = main(
        [
            "retrieval",
            "--img-emb",
            str(tmp_path / "img0.npy"),
            "--txt-emb",
            str(tmp_path / "txt0.npy"),
            "--txt-to-img",
            str(tmp_path / "map0.json"),
            "--chunk-size",
            "7",
            "--name",
            "noisy",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "d2s-bench-retrieval" and doc["name"] == "noisy"
    assert doc["benchmarks"]["custom"]["metrics"] == pytest.approx(retrieval_metrics(img, txt).to_dict())
    assert "| custom | 30 | 150 |" in (out / "results.md").read_text()
    assert "rSum" in capsys.readouterr().out

    # a second run from one safetensors file, with a long-text family
    from safetensors.numpy import save_file

    img1, txt1 = write_saved(tmp_path, 1)
    save_file(
        {"img": img1, "txt": txt1, "dense": img1 + 0.1, "dense_img": np.arange(30)}, str(tmp_path / "e1.safetensors")
    )
    assert main(["retrieval", "--embeddings", str(tmp_path / "e1.safetensors"), "--out", str(tmp_path / "run1")]) == 0
    r1 = read_results(tmp_path / "run1")
    assert set(r1.benchmarks) == {"custom", "long_text"} and r1.benchmarks["long_text"].metrics.rsum == 600

    cmp_dir = tmp_path / "cmp"
    assert main(["compare", str(out / "results.json"), str(tmp_path / "run1"), "--out", str(cmp_dir)]) == 0
    png_bytes = (cmp_dir / "recall_curves.png").read_bytes()
    assert png_bytes[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png_bytes)).size[0] > 100
    md = (cmp_dir / "compare.md").read_text()
    assert "## custom" in md and "## long_text" in md and "noisy" in md
    csv = (cmp_dir / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("run,benchmark,images,texts,i2t_r1") and len(csv) == 1 + 3


def test_cli_bad_inputs_exit_2_with_message(tmp_path, capsys):
    write_saved(tmp_path, 0)
    np.save(tmp_path / "bad.npy", np.full((30, 16), np.nan, np.float32))
    rc = main(
        [
            "retrieval",
            "--img-emb",
            str(tmp_path / "bad.npy"),
            "--txt-emb",
            str(tmp_path / "txt0.npy"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "NaN" in capsys.readouterr().err
    (tmp_path / "short.json").write_text(json.dumps([0] * 10))
    rc = main(
        [
            "retrieval",
            "--img-emb",
            str(tmp_path / "img0.npy"),
            "--txt-emb",
            str(tmp_path / "txt0.npy"),
            "--txt-to-img",
            str(tmp_path / "short.json"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "expected shape [150]" in capsys.readouterr().err
    rc = main(
        [
            "retrieval",
            "--img-emb",
            str(tmp_path / "img0.npy"),
            "--txt-emb",
            str(tmp_path / "txt0.npy"),
            "--protocol",
            "coco_5k",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "expects 5000 images, got 30" in capsys.readouterr().err
    assert main(["retrieval", "--out", str(tmp_path / "o")]) == 2
    assert main(["retrieval", "--bundle", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["compare", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "o").exists()


def write_shards(root, n=10, dense_every=1):
    names = list(COLORS)
    with ShardWriter(root, "test", 0) as w:
        for i in range(n):
            c = names[i % len(names)]
            dense = [DenseText(f"a picture that is entirely {c}", "test")] if i % dense_every == 0 else []
            w.write(
                Sample(
                    f"s{i:03d}",
                    png(COLORS[c]),
                    "png",
                    f"s{i}",
                    "toy",
                    "test",
                    sparse=[f"{c} square", f"something {c}"],
                    dense=dense,
                )
            )
    write_manifest(root)


def test_load_shards_and_embed_with_stand_in(tmp_path):
    write_shards(tmp_path / "shards", n=10, dense_every=2)
    data = load_shards(tmp_path / "shards", "test", max_captions=1)
    assert len(data.images) == 10 and len(data.captions) == 10 and list(data.dense_img) == [0, 2, 4, 6, 8]
    emb = embed_eval_set(ColorEncoder(), data, RetrievalSettings())
    res = evaluate_embeddings(emb, RetrievalSettings())
    # 5 colours, each twice: ties between same-coloured images resolved by index (stable rule)
    assert res["custom"].metrics.i2t_r5 == 100 and res["custom"].metrics.t2i_r1 == 50
    assert res["long_text"].n_images == 5 and res["long_text"].metrics.rsum == 600
    with pytest.raises(KeyError, match="no split 'val'"):
        load_shards(tmp_path / "shards", "val")


def test_corrupt_image_is_named_with_shard_and_key(tmp_path):
    from d2s.schema import SampleError

    write_shards(tmp_path / "shards", n=10)
    # really damaged bytes inside a real shard: sample s003's PNG cut in half, s007's not an image at all
    records = {"s003": lambda b: b[: len(b) // 2], "s007": lambda b: b"\x00no image here" * 4}
    for key, damage in records.items():
        root = tmp_path / key
        names = list(COLORS)
        with ShardWriter(root, "test", 0) as w:
            for i in range(10):
                c = names[i % len(names)]
                im = png(COLORS[c])
                w.write(
                    Sample(
                        f"s{i:03d}",
                        damage(im) if f"s{i:03d}" == key else im,
                        "png",
                        f"s{i}",
                        "toy",
                        "test",
                        sparse=[f"{c} square"],
                    )
                )
        write_manifest(root)
        data = load_shards(root, "test")
        with pytest.raises(SampleError) as e:
            embed_eval_set(ColorEncoder(), data, RetrievalSettings(image_batch_size=4))
        assert e.value.key == key and e.value.shard.endswith("test-000000.tar"), str(e.value)
        assert "cannot decode" in str(e.value)


def test_karpathy_corrupt_image_file_is_named(tmp_path):
    from d2s.schema import SampleError

    (tmp_path / "imgs").mkdir()
    entries = []
    for i, c in enumerate(COLORS):
        data = png(COLORS[c])
        (tmp_path / "imgs" / f"{c}.png").write_bytes(data[: len(data) // 2] if c == "blue" else data)
        entries.append({"filename": f"{c}.png", "split": "test", "sentences": [{"raw": f"a {c} thing"}], "imgid": i})
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    data = load_karpathy(tmp_path / "k.json", tmp_path / "imgs", "test")
    with pytest.raises(SampleError, match=r"image file .*blue\.png.*cannot decode"):
        embed_eval_set(ColorEncoder(), data, RetrievalSettings())


def test_karpathy_loader(tmp_path):
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    entries = []
    for i, c in enumerate(COLORS):
        (tmp_path / "imgs" / "val2014" / f"{c}.png").write_bytes(png(COLORS[c]))
        sents = [{"raw": f"a {c} thing {k}"} for k in range(6 if i == 0 else 5)]
        entries.append(
            {
                "filepath": "val2014",
                "filename": f"{c}.png",
                "split": "test" if i < 4 else "train",
                "sentences": sents,
                "cocoid": i,
            }
        )
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    data = load_karpathy(tmp_path / "k.json", tmp_path / "imgs", "test")
    assert len(data.images) == 4 and len(data.captions) == 20  # the 6th caption of image 0 is dropped
    assert len(load_karpathy(tmp_path / "k.json", tmp_path / "imgs", "test", max_captions=0).captions) == 21
    r = evaluate_embeddings(embed_eval_set(ColorEncoder(), data), RetrievalSettings(long_text=False))
    assert r["custom"].metrics.rsum == 600
    with pytest.raises(DatasetError, match="no images in split 'val'"):
        load_karpathy(tmp_path / "k.json", tmp_path / "imgs", "val")
    with pytest.raises(DatasetError, match="not found"):
        load_karpathy(tmp_path / "k.json", tmp_path / "nowhere", "test")


def test_stage_through_pipeline_runner(tmp_path, monkeypatch):
    """The registered stage type runs in a pipeline; the model side is a stand-in (see report)."""
    from d2s.pipeline import Runner, load_pipeline

    write_shards(tmp_path / "shards", n=10)
    (tmp_path / "bundle").mkdir()
    seen = []
    monkeypatch.setattr(bench.stages, "load_encoder", lambda path, device=None: seen.append(path) or ColorEncoder())
    doc = {
        "stages": {
            "eval": {
                "type": "bench-retrieval",
                "params": {"split": "test", "protocols": ["custom"], "chunk_size": 4},
                "inputs": {"bundle": str(tmp_path / "bundle"), "shards": str(tmp_path / "shards")},
            }
        }
    }
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    report = Runner(p).run()
    out = p.stage("eval").outputs["results"]
    res = read_results(out)
    assert seen == [str(tmp_path / "bundle")]
    assert set(res.benchmarks) == {"custom", "long_text"} and (out / "results.md").exists()
    assert report[0]["summary"]["long_text"] == pytest.approx(res.benchmarks["long_text"].metrics.rsum)
    assert res.benchmarks["custom"].metrics.t2i_r1 == 50  # two images per colour: half the captions lose the tie
    with pytest.raises(Exception, match="unknown protocol"):
        load_pipeline(
            doc={"stages": {"eval": {**doc["stages"]["eval"], "params": {"protocols": ["coco_2k"]}}}},
            run_dir=tmp_path / "run",
        )


def test_results_roundtrip_named_fields(tmp_path):
    emb = Embeddings(torch.eye(3), torch.eye(3), torch.arange(3))
    r = BenchResults("x", evaluate_embeddings(emb))
    d = r.to_dict()
    assert set(d["benchmarks"]["custom"]["metrics"]) >= {"i2t_r1", "t2i_r10", "rsum", "t2i_meanr"}
    assert BenchResults.from_dict(json.loads(json.dumps(d))).benchmarks["custom"].metrics.rsum == 600


def test_cli_error_is_printed_once_and_log_level_after_subcommand(tmp_path):
    import subprocess
    import sys

    # a real process: the error line must reach stderr exactly once, naming the command
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "retrieval", "--embeddings", str(tmp_path / "missing.safetensors")]
        + ["--out", str(tmp_path / "o"), "--log-level", "warning"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("missing.safetensors") == 1, out.stderr
    assert "bench retrieval:" in out.stderr
