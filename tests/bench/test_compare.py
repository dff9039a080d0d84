"""Protocol manifests in results, and `bench compare` refusing results measured under different protocols."""

import json

import numpy as np
import pytest

from bench.api import read_results
from bench.cli import main
from bench.manifest import protocol_differences


def saved(tmp_path, name, seed, n=20, per=5, mapping=None):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 8)).astype(np.float32)
    txt = (np.repeat(img, per, axis=0) + rng.normal(scale=1.2, size=(n * per, 8))).astype(np.float32)
    np.save(tmp_path / f"{name}_img.npy", img)
    np.save(tmp_path / f"{name}_txt.npy", txt)
    m = mapping if mapping is not None else [j // per for j in range(n * per)]
    (tmp_path / f"{name}_map.json").write_text(json.dumps(m))
    return [
        "--img-emb",
        str(tmp_path / f"{name}_img.npy"),
        "--txt-emb",
        str(tmp_path / f"{name}_txt.npy"),
        "--txt-to-img",
        str(tmp_path / f"{name}_map.json"),
    ]


def run(tmp_path, name, args, extra=()):
    out = tmp_path / f"res_{name}"
    assert main(["retrieval", *args, "--name", name, "--bootstrap", "200", *extra, "--out", str(out)]) == 0
    return out


def test_manifest_written_with_every_result(tmp_path):
    out = run(tmp_path, "a", saved(tmp_path, "a", 0))
    r = read_results(out).benchmarks["custom"]
    m = r.manifest
    assert m["benchmark"] == "custom" and m["ties"] == "stable" and m["engine"] == "exact"
    assert m["protocol"]["pairs"] == {"images": 20, "texts": 100, "captions_per_image": "5"}
    assert m["protocol"]["directions"] == ["image->text", "text->image"]
    assert m["model"]["kind"] == "embeddings" and len(m["model"]["files"]["img_emb"]) == 64
    assert len(m["data"]["content_sha256"]) == 64
    assert r.query_ranks is not None and r.query_ranks.i2t.shape == (20,)
    md = (out / "results.md").read_text()
    assert "95% bootstrap intervals" in md and "| custom | [" in md


def test_compare_same_protocol_with_paired_intervals(tmp_path):
    a = run(tmp_path, "a", saved(tmp_path, "a", 0))
    b = run(tmp_path, "b", saved(tmp_path, "b", 1))
    a2 = run(tmp_path, "a_again", saved(tmp_path, "a2", 0))  # the same embeddings again
    cmp = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), str(a2), "--out", str(cmp)]) == 0
    md = (cmp / "compare.md").read_text()
    assert "Paired difference against a" in md and "rSum interval" in md
    paired = (cmp / "paired.csv").read_text().splitlines()
    head = paired[0].split(",")
    row_same = dict(zip(head, next(line for line in paired if ",a_again," in line).split(",")))
    assert float(row_same["rsum"]) == 0.0 and float(row_same["rsum_low"]) == 0.0 and float(row_same["rsum_high"]) == 0.0
    row_b = dict(zip(head, next(line for line in paired if ",b," in line).split(",")))
    ra, rb = read_results(a).benchmarks["custom"], read_results(b).benchmarks["custom"]
    assert float(row_b["rsum"]) == pytest.approx(rb.metrics.rsum - ra.metrics.rsum)
    assert float(row_b["rsum_low"]) <= float(row_b["rsum"]) <= float(row_b["rsum_high"])
    # another reference: the differences change sign, the intervals mirror (same draws, same seed)
    assert main(["compare", str(a), str(b), "--reference", "b", "--out", str(tmp_path / "cmp_b")]) == 0
    assert "Paired difference against b" in (tmp_path / "cmp_b" / "compare.md").read_text()
    lines = (tmp_path / "cmp_b" / "paired.csv").read_text().splitlines()
    row_a = dict(zip(lines[0].split(","), next(line for line in lines if ",a," in line).split(",")))
    assert float(row_a["rsum"]) == pytest.approx(-float(row_b["rsum"]))
    assert float(row_a["rsum_low"]) == pytest.approx(-float(row_b["rsum_high"]))
    assert main(["compare", str(a), str(b), "--reference", "zzz", "--out", str(tmp_path / "cmp_z")]) == 2


def test_compare_refuses_other_tie_rule_and_other_data(tmp_path, capsys):
    a = run(tmp_path, "a", saved(tmp_path, "a", 0))
    opt = run(tmp_path, "opt", saved(tmp_path, "b", 1), ["--ties", "optimistic"])
    assert main(["compare", str(a), str(opt), "--out", str(tmp_path / "c1")]) == 2
    err = capsys.readouterr().err
    assert "refusing to compare" in err and "custom: 'a' and 'opt'" in err
    assert "ties: 'stable' vs 'optimistic'" in err
    assert not (tmp_path / "c1" / "compare.md").exists()

    # the same sizes, but captions mapped to other images: other data, refused, naming what differs
    other_map = np.repeat(np.arange(20), [6] + [5] * 18 + [4]).tolist()
    moved = run(tmp_path, "moved", saved(tmp_path, "m", 2, mapping=other_map))
    sizes = run(tmp_path, "sizes", saved(tmp_path, "s", 3, n=10))
    assert main(["compare", str(a), str(moved), str(sizes), "--out", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "'a' and 'moved'" in err and "data.content_sha256" in err and "captions_per_image: '5' vs '4-6'" in err
    assert "'a' and 'sizes'" in err and "protocol.pairs.images: 20 vs 10" in err


def test_protocol_differences_ignores_model_and_location():
    base = {"benchmark": "x", "ties": "stable", "data": {"source": "/a", "files": {"f": "1"}}, "model": {"sha256": "m"}}
    moved = {**base, "data": {"source": "/b", "files": {"f": "1"}}, "model": {"sha256": "n"}}
    assert protocol_differences(base, moved) == []
    changed = {**base, "data": {"source": "/a", "files": {"f": "2"}}}
    assert protocol_differences(base, changed) == ["data.files.f: '1' vs '2'"]
    assert protocol_differences(base, {**base, "extra": 1}) == ["extra: '<absent>' vs 1"]
