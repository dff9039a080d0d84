"""The app's JSON API on a real run directory (tests/ui/conftest.py): search, corpus, runs, files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.ui.conftest import SCORED_SENTENCES, SHORT_CAPTION

pytestmark = pytest.mark.slow  # the session's run directory takes ~20 s to build

Q = {"ds": "world", "split": "train"}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("page", ["search", "corpus", "runs"])
def test_pages_are_served(ui_client, page):
    r = ui_client.get(f"/{page}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert f'data-page="{page}"' in r.text and '<script src="/static/app.js">' in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert ui_client.get("/static/app.js").status_code == 200
    assert ui_client.get("/static/../config.py").status_code == 404


def test_config_finds_what_the_run_holds(ui_client, ui_run):
    from d2s_ui.config import build_config

    assert build_config(ui_run).host == "127.0.0.1"  # this machine only, unless --host says otherwise
    doc = ui_client.get("/api/config").json()
    assert [d["name"] for d in doc["datasets"]] == ["world"]
    assert doc["datasets"][0]["splits"] == {"train": 40}
    assert sorted(m["name"] for m in doc["models"]) == ["init", "trained"]
    assert sorted(doc["runs"]) == ["bench_init", "bench_trained"]
    assert doc["reports"][0]["name"] == "captions" and "lengths.png" in doc["reports"][0]["figures"]


def test_exact_caption_finds_its_image_as_the_bundle_ranks_it(ui_client, ui_run, best_query):
    import torch

    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    caption, key = best_query
    r = ui_client.get("/api/search", params={**Q, "model": "trained", "q": caption, "k": 10})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["results"][0]["key"] == key and doc["results"][0]["own"] is True
    assert [x["own"] for x in doc["results"][1:]] == [False] * 9
    # the whole top 10 is the bundle's own ranking, computed here without the app
    b = load_bundle(ui_run / "trained" / "bundle")
    samples = read_samples(ui_run / "world" / "shards", "train")
    sims = (b.embed_texts([caption]) @ b.embed_images([s.image for s in samples]).T)[0]
    want = [samples[i].key for i in torch.argsort(-sims, stable=True)[:10].tolist()]
    assert [x["key"] for x in doc["results"]] == want
    assert [x["score"] for x in doc["results"]] == pytest.approx(sorted(sims.tolist(), reverse=True)[:10], abs=1e-3)


def test_embeddings_are_cached_outside_the_run_and_reused(ui_run, best_query, tmp_path):
    from starlette.testclient import TestClient

    from d2s_ui.app import build_app
    from d2s_ui.config import build_config

    before = _tree(ui_run)
    cfg = build_config(ui_run, cache_dir=tmp_path / "cache")
    params = {**Q, "model": "trained", "q": best_query[0], "k": 5}
    by_image = {**Q, "model": "trained", "key": best_query[1], "k": 20}
    with TestClient(build_app(cfg)) as c:
        first = c.get("/api/search", params=params).json()
        first_texts = c.get("/api/search_image", params=by_image).json()["results"]
    assert first["cached"] is False
    files = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert files == [".json", ".safetensors"]
    with TestClient(build_app(cfg)) as c:  # a new app: reads the cache file
        again = c.get("/api/search", params=params).json()
        other = c.get("/api/search", params={**params, "model": "init"}).json()
        texts = c.get("/api/search_image", params=by_image).json()["results"]  # text embeddings read now
    assert again["cached"] is True and again["results"] == first["results"]
    assert texts == first_texts
    assert other["cached"] is False and len(list((tmp_path / "cache").iterdir())) == 4  # keyed by bundle
    assert _tree(ui_run) == before  # nothing written into the run


def test_faiss_engine_gives_the_exact_ranking(ui_run, best_query, tmp_path):
    from starlette.testclient import TestClient

    from d2s_ui.app import build_app
    from d2s_ui.config import build_config

    params = {**Q, "model": "trained", "q": best_query[0], "k": 8}
    got = {}
    for engine in ("exact", "faiss"):
        with TestClient(build_app(build_config(ui_run, cache_dir=tmp_path / "c", engine=engine))) as c:
            got[engine] = c.get("/api/search", params=params).json()
    cfg = build_config(ui_run, cache_dir=tmp_path / "c")
    assert cfg.engine == "auto" and cfg.faiss_min_images > 40
    with TestClient(build_app(cfg)) as c:
        assert c.get("/api/search", params=params).json()["engine"] == "exact"
    cfg.faiss_min_images = 40  # auto: FAISS from this many images on
    with TestClient(build_app(cfg)) as c:
        assert c.get("/api/search", params=params).json()["engine"] == "faiss"
    assert got["faiss"]["engine"] == "faiss" and got["exact"]["engine"] == "exact"
    assert [x["key"] for x in got["faiss"]["results"]] == [x["key"] for x in got["exact"]["results"]]


def test_image_to_texts_ranks_its_own_caption(ui_client, best_query):
    caption, key = best_query
    doc = ui_client.get("/api/search_image", params={**Q, "model": "trained", "key": key, "k": 40}).json()
    assert {"sparse", "dense"} <= {x["kind"] for x in doc["results"]}
    assert any(x["text"] == caption and x["own"] for x in doc["results"])
    assert [x["rank"] for x in doc["results"]] == list(range(1, len(doc["results"]) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(doc["results"], doc["results"][1:]))


def test_corpus_shows_dropped_captions_with_their_reason(ui_client):
    doc = ui_client.get("/api/corpus", params={**Q, "verdict": "too_short", "size": 50}).json()
    assert doc["total"] == 10  # every fourth image has the short caption
    for s in doc["samples"]:
        short = [d for d in s["dense"] if d["source"] == "short-captioner"]
        assert [(d["text"], d["verdict"], d["prompt"]) for d in short] == [
            (SHORT_CAPTION, "too_short", "Describe briefly.")
        ]
        assert short[0]["scores"]["words"] == 3.0
    kept = ui_client.get("/api/corpus", params={**Q, "verdict": "keep", "size": 1}).json()
    assert kept["total"] == 40 and kept["pages"] == 40


def test_corpus_filters_by_score_range_source_and_key(ui_client):
    few = ui_client.get("/api/corpus", params={**Q, "score": "words", "lo": 0, "hi": 5, "size": 50}).json()
    assert few["total"] == 10
    assert ui_client.get("/api/corpus", params={**Q, "source": "short-captioner"}).json()["total"] == 10
    keys = [s["key"] for s in ui_client.get("/api/corpus", params={**Q, "size": 50}).json()["samples"]]
    one = ui_client.get("/api/corpus", params={**Q, "key": keys[1]}).json()
    assert [s["key"] for s in one["samples"]] == [keys[1]]
    sentences = one["samples"][0]["dense"][0]["sentences"]
    assert [(x["text"], x["score"], x["removed"]) for x in sentences] == [(t, s, r) for t, s, _, r in SCORED_SENTENCES]


def test_corpus_stats_count_verdicts_and_histogram_scores(ui_client):
    st = ui_client.get("/api/corpus_stats", params=Q).json()
    assert st["verdicts"]["short-captioner"] == {"too_short": 10}
    assert sum(st["verdicts"]["synthetic-oracle"].values()) == 40
    assert sum(st["scores"]["words"]["counts"]) == 50
    assert st["sentences"]["n"] == 2


def test_runs_side_by_side_with_differences(ui_client, ui_run):
    from bench.api import read_results

    doc = ui_client.get("/api/runs", params={"reference": "bench_trained"}).json()
    custom = doc["benchmarks"]["custom"]
    assert [r["run"] for r in custom["rows"]] == ["bench_init", "bench_trained"]
    a = read_results(ui_run / "bench_trained" / "results").benchmarks["custom"].metrics.to_dict()
    b = read_results(ui_run / "bench_init" / "results").benchmarks["custom"].metrics.to_dict()
    diff = custom["differences"][0]
    assert diff["run"] == "bench_trained - bench_init"
    assert diff["rsum"] == pytest.approx(a["rsum"] - b["rsum"], abs=0.02)
    assert {c["run"] for c in custom["curves"]["t2i"]} == {"bench_init", "bench_trained"}
    bad = ui_client.get("/api/runs", params={"reference": "nope"})
    assert bad.status_code == 404 and "reference 'nope'" in bad.json()["error"]


@pytest.mark.parametrize(
    "path, status, says",
    [
        ("../../../../etc/passwd", 403, "'..' leads out of the root"),
        ("captions/../../x", 403, "'..' leads out of the root"),
        ("/etc/passwd", 403, "absolute paths are not served"),
        ("C:/Windows/win.ini", 403, "absolute paths are not served"),
        ("captions\\report\\lengths.png", 403, "refused"),
        ("captions/report/nope.png", 404, "no such file"),
    ],
)
def test_files_outside_the_roots_are_refused(ui_client, path, status, says):
    r = ui_client.get("/api/file", params={"root": "run", "path": path})
    assert r.status_code == status and says in r.text
    assert "root:" not in r.text


def test_a_file_under_a_root_is_served(ui_client, ui_run):
    r = ui_client.get("/api/file", params={"root": "run", "path": "captions/report/lengths.png"})
    assert r.status_code == 200 and r.content == (ui_run / "captions" / "report" / "lengths.png").read_bytes()
    assert ui_client.get("/api/file", params={"root": "elsewhere", "path": "x"}).status_code == 404


def test_a_link_out_of_a_root_is_refused(tmp_path):
    from d2s_ui.config import Named, UIError
    from d2s_ui.paths import Roots

    (tmp_path / "root").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", tmp_path / "root" / "link.txt")
    with pytest.raises(UIError, match="a link leads out of the root"):
        Roots([Named("r", tmp_path / "root")]).resolve("r", "link.txt")


def test_missing_and_corrupt_files_answer_with_a_message(ui_run, tmp_path):
    from starlette.testclient import TestClient

    from d2s.shards import ShardWriter, read_samples, write_manifest
    from d2s_ui.app import build_app
    from d2s_ui.config import build_config

    # a shard whose sample JSON is broken, a bundle without weights, a results file that is not JSON
    bad = tmp_path / "bad"
    samples = read_samples(ui_run / "world" / "shards", "train")[:3]
    with ShardWriter(bad, "train", 0) as w:
        for s in samples:
            w.write(s)
    write_manifest(bad)
    tar = bad / "train-000000.tar"
    data = tar.read_bytes()
    doc = json.dumps(samples[1].json_dict(), ensure_ascii=False).encode()
    assert data.count(doc) == 1
    tar.write_bytes(data.replace(doc, b"{" + b" " * (len(doc) - 1)))  # same size: the tar stays readable
    bundle = tmp_path / "b"
    shutil.copytree(ui_run / "trained" / "bundle", bundle)
    (bundle / "model.safetensors").write_bytes(b"not weights")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "results.json").write_text("{oops")
    cfg = build_config(
        shards=[f"bad={bad}"],
        bundles=[f"broken={bundle}"],
        results=[f"res={tmp_path / 'res'}"],
        cache_dir=tmp_path / "c",
    )
    with TestClient(build_app(cfg)) as c:
        page = c.get("/api/corpus", params={"ds": "bad", "split": "train"}).json()
        problem = [s for s in page["samples"] if "problem" in s]
        assert [s["key"] for s in problem] == [samples[1].key]
        assert "train-000000.tar" in problem[0]["problem"] and "malformed json" in problem[0]["problem"]
        r = c.get("/api/search", params={"ds": "bad", "split": "train", "model": "broken", "q": "x"})
        assert r.status_code == 422 and "model broken: cannot load" in r.json()["error"]
        assert "Traceback" not in r.text
        runs = c.get("/api/runs").json()
        assert runs["problems"] and "not JSON" in runs["problems"][0]
        r = c.get("/api/corpus", params={"ds": "bad", "split": "val"})
        assert r.status_code == 404 and "no split 'val'" in r.json()["error"]
        r = c.get("/api/image", params={"ds": "bad", "split": "train", "key": "nope"})
        assert r.status_code == 404 and "no sample with key 'nope'" in r.text
        (bad / "manifest.json").unlink()
        r = c.get("/api/corpus", params={"ds": "bad", "split": "train"})
        assert r.status_code == 404 and "manifest.json not found" in r.json()["error"]


@pytest.mark.parametrize(
    "params, says",
    [
        ({"k": "ten"}, "k: expected an integer"),
        ({"k": "0"}, "k: 0 is outside"),
        ({"q": "  "}, "q: type a sentence"),
        ({"model": "nope"}, "model 'nope': no such model"),
        ({"ds": "nope"}, "ds 'nope': no such shard directory"),
    ],
)
def test_bad_search_parameters_are_named(ui_client, params, says):
    r = ui_client.get("/api/search", params={**Q, "model": "trained", "q": "a red circle", **params})
    assert r.status_code in (400, 404) and says in r.json()["error"]


def test_command_line_errors_name_the_field(ui_run, tmp_path, caplog):
    from d2s.cli import main

    assert main(["ui", str(tmp_path / "nope")]) == 2
    assert "RUN_DIR" in caplog.text and "is not a directory" in caplog.text
    assert main(["ui", str(ui_run), "--cache-dir", str(ui_run / "cache")]) == 2
    assert "cache_dir" in caplog.text and "never writes under what it shows" in caplog.text
    assert main(["ui", "--bundle", f"a={tmp_path / 'missing'}"]) == 2
    assert "bundles: a:" in caplog.text


def test_a_pipeline_run_dir_is_found_as_the_stages_left_it(ui_run, tmp_path):
    """vse-train leaves <stage>/bundle and its copy <stage>/run/bundle, plus run/bundle-raw."""
    import shutil

    from d2s_ui.config import discover

    src = ui_run / "trained" / "bundle"
    run = tmp_path / "run"
    shutil.copytree(src, run / "d2s" / "bundle")
    shutil.copytree(src, run / "d2s" / "run" / "bundle")
    shutil.copytree(src, run / "d2s" / "run" / "bundle-raw")
    shutil.copytree(src, run / "d2s" / "run" / "best")  # a checkpoint folder: never a bundle
    other = run / "baseline" / "run" / "bundle"
    shutil.copytree(src, other)
    cfg = json.loads((other / "vse_config.json").read_text())
    (other / "vse_config.json").write_text(json.dumps({**cfg, "recipe": "baseline"}))
    shutil.copytree(ui_run / "world", run / "world")
    found = discover(run)
    assert {n.name: n.path.relative_to(run).as_posix() for n in found["bundles"]} == {
        "baseline": "baseline/run/bundle",
        "d2s": "d2s/bundle",
        "d2s raw": "d2s/run/bundle-raw",
    }
    assert [n.name for n in found["shards"]] == ["world"]


def test_search_under_an_hf_dual_encoder(ui_run, tmp_path):
    """``--hf NAME=MODEL``: a tiny random CLIP saved with save_pretrained, through vse.scoring."""
    import torch
    from starlette.testclient import TestClient

    from d2s.shards import read_samples
    from d2s_ui.app import build_app
    from d2s_ui.config import build_config
    from densecap.testing.tiny_clip import build_tiny_clip
    from vse.scoring import HFDualEncoderScorer

    clip = build_tiny_clip(tmp_path / "clip")
    world = ui_run / "world" / "shards"
    cfg = build_config(shards=[f"world={world}"], hf_models=[f"clip={clip}"], cache_dir=tmp_path / "c")
    query = "a red circle above a blue square"
    with TestClient(build_app(cfg)) as c:
        doc = c.get("/api/search", params={**Q, "model": "clip", "q": query, "k": 5}).json()
        assert c.get("/api/config").json()["models"] == [{"name": "clip", "kind": "hf", "path": str(clip)}]
    ref = HFDualEncoderScorer({"model": str(clip), "progress": False})
    samples = read_samples(world, "train")
    sims = (ref.embed_texts([query]) @ ref.embed_images([s.image for s in samples], [s.key for s in samples]).T)[0]
    want = [samples[i].key for i in torch.argsort(-sims, stable=True)[:5].tolist()]
    assert [x["key"] for x in doc["results"]] == want


def test_search_a_folder_of_images(ui_run, tmp_path):
    """``--images DIR``: image files in folders, searched like a split named ``images``."""
    import torch
    from starlette.testclient import TestClient

    from d2s.shards import read_samples
    from d2s_ui.app import build_app
    from d2s_ui.config import build_config
    from vse.bundle import load_bundle

    samples = read_samples(ui_run / "world" / "shards", "train")[:12]
    folder = tmp_path / "photos"
    for i, s in enumerate(samples):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{s.key}.{s.image_ext}").write_bytes(s.image)
    (folder / "notes.txt").write_text("not an image")
    cfg = build_config(
        images=[f"photos={folder}"], bundles=[f"trained={ui_run / 'trained' / 'bundle'}"], cache_dir=tmp_path / "c"
    )
    query = samples[3].sparse[0]
    q = {"ds": "photos", "split": "images", "model": "trained", "q": query, "k": 12}
    with TestClient(build_app(cfg)) as c:
        assert c.get("/api/config").json()["datasets"][0]["splits"] == {"images": 12}
        doc = c.get("/api/search", params=q).json()
        first = doc["results"][0]["key"]
        r = c.get("/api/image", params={"ds": "photos", "split": "images", "key": first})
        assert r.status_code == 200 and r.content == (folder / first).read_bytes()
        for bad in ("../c/x.png", "/etc/passwd"):
            r = c.get("/api/image", params={"ds": "photos", "split": "images", "key": bad})
            assert r.status_code == 403 and "refused" in r.text
        assert c.get("/api/image", params={"ds": "photos", "split": "images", "key": "notes.txt"}).status_code == 403
        r = c.get("/api/corpus", params={"ds": "photos", "split": "images"})
        assert r.status_code == 400 and "no captions to browse" in r.json()["error"]
    b = load_bundle(ui_run / "trained" / "bundle")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    sims = (b.embed_texts([query]) @ b.embed_images([(folder / f).read_bytes() for f in files]).T)[0]
    assert [x["key"] for x in doc["results"]] == [files[i] for i in torch.argsort(-sims, stable=True).tolist()]
    # an image that cannot be decoded is named by its path
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = build_config(
        images=[f"photos={folder}"], bundles=[f"trained={ui_run / 'trained' / 'bundle'}"], cache_dir=tmp_path / "c2"
    )
    with TestClient(build_app(cfg)) as c:
        r = c.get("/api/search", params=q)
    assert r.status_code == 422 and "a/broken.png" in r.json()["error"]
