"""A small run directory laid out as a pipeline writes one, built for real once per session:

    run/world/shards          the synthetic world's train split (40 images), each image with its
                              oracle dense text and a short second caption, verdicts set by
                              densecap's real filters (the short one: ``too_short``); one caption
                              carries sentence grounding scores
    run/captions/report       densecap's report of those shards (lengths.png, summary.json)
    run/trained/bundle        a tiny-vit trained 80 steps (InfoNCE, image <-> sparse caption)
    run/init/bundle           the same after 2 steps
    run/bench_*/results       ``bench retrieval`` of each bundle on the shards

plus the app (Starlette's test client), the real ``d2s ui`` command in a subprocess, and
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, which scripts/test.sh installs)
driven by Selenium.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
SHORT_CAPTION = "A red shape."
SCORED_SENTENCES = [("The image shows shapes.", 2.4, 0.31, False), ("A purple dragon flies.", -0.8, 0.05, True)]


def _write_world(out: Path, n: int) -> None:
    from d2s.schema import DenseText, Sentence
    from d2s.shards import ShardWriter, write_manifest
    from d2s.synthetic import SplitSpec, WorldConfig, describe, iter_world
    from densecap.filters import FilterChain, LengthFilter, RepetitionFilter

    chain = FilterChain([LengthFilter(LengthFilter.Params()), RepetitionFilter(RepetitionFilter.Params())])
    with ShardWriter(out, "train", 0) as w:
        for i, s in enumerate(iter_world(WorldConfig(world_seed=0), SplitSpec("train", n, 0))):
            oracle = DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle", model="oracle")
            short = DenseText(SHORT_CAPTION, source="short-captioner", model="tiny", prompt="Describe briefly.")
            s.dense = [oracle] if i % 4 else [oracle, short]
            for d in s.dense:
                chain.apply(d, s)
            if i == 1:
                oracle.sentences = [Sentence(t, sc, sim, rm) for t, sc, sim, rm in SCORED_SENTENCES]
                oracle.scorer = "vse-bundle:test"
            w.write(s)
    write_manifest(out)


def _train(world: Path, assets: Path, out: Path, steps: int) -> Path:
    from vse_train.config import parse_config
    from vse_train.train import train

    recipe = out.parent / "infonce.json"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        json.dumps(
            {
                "losses": [{"kind": "infonce", "inputs": ["image", "sparse"]}],
                "lr_mult": {"image_backbone": 1.0, "text_backbone": 1.0},
            }
        )
    )
    doc = {
        "shards": str(world),
        "out": str(out),
        "assets": str(assets),
        "model": "tiny-vit",
        "recipe": str(recipe),
        "steps": steps,
        "threads": 1,
        "val_every": 0,
        "tracker": "none",
        "log_every": 20,
        "save_every": 1000,
        "data": {"batch_size": 32, "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 2e-3},
    }
    s = train(parse_config(doc))
    bundle = out.parent / "bundle"
    shutil.copytree(s["bundle"], bundle)
    return bundle


@pytest.fixture(scope="session")
def ui_run(tmp_path_factory) -> Path:
    """The run directory above (about 20 s on one core)."""
    import torch

    from bench.cli import main as bench_main
    from densecap.report import write_report
    from vse.assets import build_assets

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ui")
    run = root / "run"
    world = run / "world" / "shards"
    _write_world(world, 40)
    write_report(world, run / "captions" / "report")
    build_assets(world, root / "assets", ["tiny-vit"])
    for name, steps in (("trained", 80), ("init", 2)):
        _train(world, root / "assets", run / name / "train", steps)
        shutil.rmtree(run / name / "train")  # the bundle alone, as a finished stage leaves it
        rc = bench_main(
            [
                "retrieval",
                "--bundle",
                str(run / name / "bundle"),
                "--shards",
                str(world),
                "--split",
                "train",
                "--name",
                name,
                "--out",
                str(run / f"bench_{name}" / "results"),
            ]
        )
        assert rc == 0
    return run


@pytest.fixture(scope="session")
def best_query(ui_run) -> tuple[str, str]:
    """(sparse caption, key of its image): the caption whose own image the trained bundle ranks
    first by the widest margin, found here by brute force with the bundle itself (not the app)."""
    import torch

    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    b = load_bundle(ui_run / "trained" / "bundle")
    samples = read_samples(ui_run / "world" / "shards", "train")
    img = b.embed_images([s.image for s in samples])
    caps = [(c, i) for i, s in enumerate(samples) for c in s.sparse]
    txt = b.embed_texts([c for c, _ in caps])
    sim = txt @ img.T
    own = sim[torch.arange(len(caps)), torch.tensor([i for _, i in caps])]
    other = sim.clone()
    other[torch.arange(len(caps)), torch.tensor([i for _, i in caps])] = -2
    margin = own - other.max(1).values
    j = int(margin.argmax())
    assert margin[j] > 0, "the trained bundle ranks no caption's own image first"
    counts = [c for c, _ in caps].count(caps[j][0])
    assert counts == 1, "the chosen caption is not unique in the split"
    return caps[j][0], samples[caps[j][1]].key


@pytest.fixture
def ui_client(ui_run, tmp_path):
    from starlette.testclient import TestClient

    from d2s_ui.app import build_app
    from d2s_ui.config import build_config

    cfg = build_config(ui_run, cache_dir=tmp_path / "cache")
    with TestClient(build_app(cfg)) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ui_server(ui_run, tmp_path_factory):
    """The real ``d2s ui RUN_DIR`` command, serving on a free port of 127.0.0.1."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    cache = tmp_path_factory.mktemp("ui-cache")
    d2s = Path(sys.executable).with_name("d2s")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(d2s), "ui", str(ui_run), "--port", str(port), "--cache-dir", str(cache)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TORCH_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/config", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"d2s ui did not start (exit {proc.poll()}):\n{log.read_text()}", pytrace=False)
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian's packages; missing, the browser tests fail naming the fix."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "headless Chromium is not installed: `bash scripts/test.sh` installs it "
            "(apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
