"""Grounding in densecap: scores stored with the captions, repairs, rescoring finished shards
(resumable, reusing stored scores), bad inputs, the Ray executor, and the real vLLM path.

The scorer is a tiny random CLIP built here (``hf-dual-encoder``); its numbers mean nothing, so
the tests check the plumbing: what is stored, counted, kept, resumed and refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from d2s.schema import DenseText, Sample
from d2s.shards import ShardWriter, completed_shards, iter_samples, write_manifest
from densecap.cli import main

from .conftest import REPO, densecap_cmd, png_bytes, run_densecap


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from densecap.testing.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def scorer_args(clip: Path, *extra: str) -> list[str]:
    return ["--scorer", "hf-dual-encoder", "-P", f"model={clip}", "--reference-images", "8", *extra]


def samples(out: Path) -> dict[str, Sample]:
    return {s.key: s for s in iter_samples(sorted(completed_shards(out)))}


def stats(out: Path) -> dict[str, dict]:
    return {Path(k).name: v for k, v in completed_shards(out).items()}


@pytest.fixture(scope="session")
def planted(world_dir, tmp_path_factory) -> Path:
    """The test world captioned with planted errors (no grounding yet)."""
    out = tmp_path_factory.mktemp("planted") / "shards"
    args = ["run", "--no-progress", "--input", str(world_dir), "--out", str(out), "--filters", "length"]
    assert main([*args, "--caption-source", "synthetic-errors", "-C", "rate=0.4"]) == 0
    return out


def test_ground_repairs_and_keeps_what_it_removed(planted, tiny_clip, tmp_path):
    out = tmp_path / "grounded"
    args = ["ground", "--no-progress", "--input", str(planted), "--out", str(out), "--action", "repair"]
    assert main([*args, *scorer_args(tiny_clip, "--threshold", "0.0")]) == 0
    before, after = samples(planted), samples(out)
    assert sorted(before) == sorted(after) and len(after) == 32
    repaired = removed = 0
    for key, s in after.items():
        (d,) = s.dense
        original = before[key].dense[0]
        assert d.truth == original.truth and d.scorer.startswith("hf-dual-encoder:")
        assert " ".join(x.text for x in d.sentences) == original.text  # every sentence, in order
        assert d.scores["unsupported_sentences"] == sum(x.score < 0.0 for x in d.sentences)
        kept = [x for x in d.sentences if not x.removed]
        if all(x.score < 0.0 for x in d.sentences):  # nothing supported: dropped whole, text as it was
            assert d.verdict == "unsupported" and d.text == original.text and kept == d.sentences
            continue
        assert d.verdict == "keep"
        assert all(x.score >= 0.0 for x in kept) and all(x.score < 0.0 for x in d.sentences if x.removed)
        if len(kept) < len(d.sentences):
            repaired += 1
            removed += len(d.sentences) - len(kept)
            assert d.original_text == original.text and d.text == " ".join(x.text for x in kept)
        else:
            assert d.text == original.text and d.original_text == ""
    st = stats(out)
    assert sum(v.get("captions_repaired", 0) for v in st.values()) == repaired > 0
    assert sum(v.get("sentences_removed", 0) for v in st.values()) == removed
    assert sum(v.get("captions_scored", 0) for v in st.values()) == 32
    rejects = [json.loads(x) for p in (out / "rejects").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert sum(len(r["removed"]) for r in rejects if r["kind"] == "repair") == removed
    report = json.loads((out / "report" / "summary.json").read_text())
    assert report["grounding"]["sentences"] == sum(len(s.dense[0].sentences) for s in after.values())
    assert (out / "report" / "grounding.png").exists() and "## Grounding" in (out / "report" / "report.md").read_text()


def test_scores_round_trip_through_webdataset_and_datasets(planted, tiny_clip, tmp_path, monkeypatch):
    import datasets
    import webdataset as wds

    out = tmp_path / "grounded"
    assert main(["ground", "--no-progress", "--input", str(planted), "--out", str(out), *scorer_args(tiny_clip)]) == 0
    got = samples(out)
    rows = list(wds.WebDataset(sorted(completed_shards(out)), shardshuffle=False).decode())
    for row in rows:
        want = got[row["__key__"]].dense[0]
        assert [x["score"] for x in row["json"]["dense"][0]["sentences"]] == [x.score for x in want.sentences]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": str(out / "train-*.tar")}, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == 24
    for key, doc in zip(ds["__key__"], ds["json"]):
        d, want = doc["dense"][0], got[key].dense[0]
        assert [(x["text"], x["score"], x["removed"]) for x in d["sentences"]] == [
            (x.text, x.score, x.removed) for x in want.sentences
        ]
        assert d["scores"]["grounding_score"] == want.scores["grounding_score"]


def test_a_new_threshold_reuses_the_stored_scores(planted, tiny_clip, tmp_path):
    scored, again = tmp_path / "scored", tmp_path / "again"
    assert (
        main(["ground", "--no-progress", "--input", str(planted), "--out", str(scored), *scorer_args(tiny_clip)]) == 0
    )
    args = ["ground", "--no-progress", "--input", str(scored), "--out", str(again), "--action", "repair"]
    assert main([*args, *scorer_args(tiny_clip, "--threshold", "0.5")]) == 0
    st = stats(again)
    assert sum(v.get("captions_scored", 0) for v in st.values()) == 0  # no model call at all
    assert sum(v.get("captions_scores_reused", 0) for v in st.values()) == 32
    assert not any("scorer" in v for v in st.values())
    first = samples(scored)
    for key, s in samples(again).items():
        assert [x.score for x in s.dense[0].sentences] == [x.score for x in first[key].dense[0].sentences]
        d = s.dense[0]
        if d.verdict == "keep":
            assert [x.removed for x in d.sentences] == [x.score < 0.5 for x in d.sentences]
        else:
            assert d.verdict == "unsupported" and all(x.score < 0.5 for x in d.sentences)
    # the same directory with another threshold: the shards are redone from themselves, no scoring
    assert main([*args[:-2], "--action", "drop", *scorer_args(tiny_clip, "--threshold", "0.5")]) == 0
    st = stats(again)
    assert sum(v.get("captions_scored", 0) for v in st.values()) == 0 and all(v["filled"] for v in st.values())
    assert all(s.dense[0].original_text == "" for s in samples(again).values())


@pytest.mark.slow
def test_sigkilled_rescoring_resumes_without_scoring_twice(planted, tiny_clip, tmp_path):
    out = tmp_path / "grounded"
    cmd = [*densecap_cmd(), "ground", "--no-progress", "--input", str(planted), "--out", str(out)]
    cmd += [*scorer_args(tiny_clip), "--batch-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.stats.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("*.tar")
        if (out / p.name.replace(".tar", ".stats.json")).exists()
    }
    assert 1 <= len(first) < 4, first  # killed midway: some shards finished, not all
    assert main(cmd[3:]) == 0  # the rerun, in this process (the killed run was the CLI's own process)
    st = stats(out)
    assert len(st) == 4
    for name, mtime in first.items():  # finished shards are not written (scored) again
        assert (out / name).stat().st_mtime_ns == mtime
    assert sum(v.get("captions_scored", 0) for v in st.values()) == 32  # each caption scored once
    got = samples(out)
    assert sorted(got) == sorted(samples(planted)) and all(s.dense[0].sentences for s in got.values())


def _corpus(out: Path, texts: list[str], *, bad_image: bool = False) -> Path:
    with ShardWriter(out, "train", 0, image_ext="png") as w:
        for i, t in enumerate(texts):
            image = b"\x89PNG\r\n\x1a\n-not-really" if bad_image and i == 1 else png_bytes(color=(10 * i, 50, 90))
            w.write(
                Sample(
                    key=f"k{i}", image=image, image_ext="png", id=str(i), dataset="t", split="train",
                    dense=[DenseText(t, "src")],
                )
            )  # fmt: skip
    write_manifest(out)
    return out


def test_bad_inputs_are_named(tiny_clip, tmp_path, caplog):
    from densecap.testing.tiny_clip import build_tiny_bert

    corpus = _corpus(tmp_path / "c", ["A red square.", "A blue circle.", "A green star."])

    def ground(*extra: str) -> int:
        caplog.clear()
        return main(["ground", "--no-progress", "--input", str(corpus), "--out", str(tmp_path / "o"), *extra])

    assert ground("--scorer", "vse-bundle", "-P", f"path={tmp_path / 'nope'}") == 2
    assert f"grounding.scorer.params.path: {tmp_path / 'nope'}: no such bundle directory" in caplog.text
    assert ground("--scorer", "no-such-scorer") == 2
    assert "grounding.scorer.type" in caplog.text and "hf-dual-encoder" in caplog.text
    bert = build_tiny_bert(tmp_path / "bert")
    assert ground("--scorer", "hf-dual-encoder", "-P", f"model={bert}") == 2
    assert str(bert) in caplog.text and "get_image_features" in caplog.text
    empty = _corpus(tmp_path / "e", ["A red square.", "   ", "A green star."])
    caplog.clear()
    out = tmp_path / "o2"
    assert main(["ground", "--no-progress", "--input", str(empty), "--out", str(out), *scorer_args(tiny_clip)]) == 2
    assert "shard train-000000.tar: key 'k1'" in caplog.text and "empty" in caplog.text
    assert not completed_shards(out)  # nothing half written


def test_an_undecodable_image_is_rejected_by_key(tiny_clip, tmp_path):
    corpus = _corpus(tmp_path / "c", ["A red square.", "A blue circle.", "A green star."], bad_image=True)
    out = tmp_path / "o"
    assert main(["ground", "--no-progress", "--input", str(corpus), "--out", str(out), *scorer_args(tiny_clip)]) == 0
    assert sorted(samples(out)) == ["k0", "k2"]
    rejects = [json.loads(x) for x in (out / "rejects" / "train-000000.rejects.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["key"]) for r in rejects] == [("image", "k1")] and rejects[0]["reason"]


@pytest.mark.slow
@pytest.mark.ray
def test_ground_on_ray_equals_local(planted, tiny_clip, tmp_path, ray_cluster):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(["ground", "--no-progress", "--input", str(planted), "--out", str(local), *scorer_args(tiny_clip)]) == 0
    args = ["ground", "--no-progress", "--input", str(planted), "--out", str(on_ray), *scorer_args(tiny_clip)]
    args += ["--executor", "ray", "--ray-address", ray_cluster.address, "--set", "executor.replicas=2"]
    r = run_densecap(args, env=ray_cluster.client_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = samples(local), samples(on_ray)
    assert sorted(a) == sorted(b)
    for key in a:
        assert [x.score for x in a[key].dense[0].sentences] == [x.score for x in b[key].dense[0].sentences]
    assert all(v.get("worker") for v in stats(on_ray).values())  # written by Ray replicas


@pytest.mark.vllm
@pytest.mark.slow
def test_real_photos_through_vllm_then_scored(vllm_server, tiny_clip, tmp_path):
    """Real photos -> the real vLLM CPU server -> the tiny CLIP: scores stored, report shows them."""
    import io

    import skimage.data
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "colorwheel", "immunohistochemistry"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(photos / f"{name}.jpg", quality=90)
    out = tmp_path / "out"
    cfg = {
        "grounding": {"scorer": {"type": "hf-dual-encoder", "params": {"model": str(tiny_clip)}}, "reference_images": 4}
    }
    (tmp_path / "g.yaml").write_text(json.dumps(cfg))
    args = ["run", "--no-progress", "--config", str(tmp_path / "g.yaml"), "--source", "folder", "--input", str(photos)]
    args += ["--caption-source", "vllm-server", "-C", f"base_url={vllm_server.base_url}", "-C", "model=tiny-llava"]
    args += ["-C", "prompt_family=llava", "-C", "sampling.max_tokens=48", "--filters", "none", "--out", str(out)]
    r = run_densecap(args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = samples(out)
    assert len(got) == 6 and all(s.dense[0].model == "tiny-llava" for s in got.values())
    scored = [d for s in got.values() for d in s.dense if d.sentences]
    assert scored and all(d.scorer.startswith("hf-dual-encoder:") for d in scored)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["grounding"]["sentences"] == sum(len(d.sentences) for d in scored)
    assert set(summary["grounding"]["score_quantiles"]) == {"p5", "p25", "p50", "p75", "p95"}
    assert (out / "report" / "grounding.png").stat().st_size > 1000
    Image.open(io.BytesIO((out / "report" / "grounding.png").read_bytes())).verify()
