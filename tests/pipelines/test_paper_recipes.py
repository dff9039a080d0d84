"""The paper's recipes (pipelines/coco_d2s.yaml, pipelines/f30k_d2s.yaml).

(a) each passes ``d2s run --dry-run`` with its vars pointed at a small fake Karpathy split,
    and every densecap plug-in's params parse against the registered plug-in;
(b) each runs end to end with stand-ins swapped in by overrides only: a tiny random LLaVA
    behind the REAL vLLM CPU server (the session's, tests/conftest.py), the ``tiny-vit`` model
    (vse-train builds its tiny assets from the shards when no ``assets`` input is given),
    two epochs of a few steps, and the ``custom`` retrieval protocol on the 3 test images.

Without ``.venv-vllm`` the end-to-end tests FAIL (run ``bash scripts/setup_vllm_cpu.sh``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PIPELINES = {"coco": REPO / "pipelines" / "coco_d2s.yaml", "f30k": REPO / "pipelines" / "f30k_d2s.yaml"}
SPLITS = {"train": 6, "val": 3, "test": 3}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
OBJECTS = ["car", "dog", "boat", "house", "tree", "ball"]


def write_fake_karpathy(root: Path, dataset: str) -> tuple[Path, Path]:
    """12 real PNG images + a dataset_coco.json-style split file (5 sentences each)."""
    from PIL import Image, ImageDraw

    image_root = root / "images"
    folder = "val2014" if dataset == "coco" else ""
    (image_root / folder).mkdir(parents=True, exist_ok=True)
    images, n = [], 0
    for split, count in SPLITS.items():
        for _ in range(count):
            colour, obj = COLOURS[n % len(COLOURS)], OBJECTS[(n * 5 + 1) % len(OBJECTS)]
            img = Image.new("RGB", (72, 56), (20 * n % 255, 90, 255 - 17 * n % 255))
            ImageDraw.Draw(img).rectangle([8 + n, 8, 40 + n, 40], fill=(255, 255 - 20 * n, 0))
            name = f"img_{n:03d}.png"
            img.save(image_root / folder / name, format="PNG")
            sentences = [
                f"a {colour} {obj} in the picture",
                f"there is a {obj} that is {colour}",
                f"photo of one {colour} {obj}",
                f"a {obj} on a plain background",
                f"the {colour} {obj} is near the centre",
            ]
            images.append(
                {
                    "filepath": folder,
                    "filename": name,
                    "split": split,
                    "imgid": n,
                    ("cocoid" if dataset == "coco" else "flickrid"): 1000 + n,
                    "sentids": list(range(5 * n, 5 * n + 5)),
                    "sentences": [
                        {"raw": s, "tokens": s.split(), "imgid": n, "sentid": 5 * n + i}
                        for i, s in enumerate(sentences)
                    ],
                }
            )
            n += 1
    split_file = root / f"dataset_{dataset}.json"
    split_file.write_text(json.dumps({"dataset": dataset, "images": images}))
    return split_file, image_root


def d2s(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "d2s.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def data_overrides(split_file: Path, image_root: Path) -> list[str]:
    return [f"vars.karpathy_json={split_file}", f"vars.image_root={image_root}"]


# ---- (a) dry-run validation -------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["coco", "f30k"])
def test_paper_pipeline_dry_run(dataset, tmp_path):
    split_file, image_root = write_fake_karpathy(tmp_path / "data", dataset)
    r = d2s(
        [
            "run",
            str(PIPELINES[dataset]),
            "--dry-run",
            "--run-dir",
            str(tmp_path / "run"),
            *data_overrides(split_file, image_root),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = json.loads(r.stdout[r.stdout.index("[") :])
    assert [e["stage"] for e in plan] == [
        "captions",
        "stage1",
        "d2s",
        "baseline",
        "bench_baseline",
        "bench_d2s",
        "report",
    ]
    assert all(e["action"] == "run" for e in plan)


@pytest.mark.parametrize("dataset", ["coco", "f30k"])
def test_paper_pipeline_recipe_values(dataset, tmp_path):
    """The paper's settings are what the file says, and every plug-in's params parse."""
    from d2s.config import from_dict
    from densecap.caption_sources import CAPTION_SOURCES
    from densecap.filters import FILTERS
    from densecap.images import IMAGE_SOURCES
    from vse_train.stages import VseTrainParams

    doc = yaml.safe_load(PIPELINES[dataset].read_text())
    v, st = doc["vars"], doc["stages"]
    assert v["model"] == "vit-b16-224-bert-base"
    assert (v["epochs"], v["batch_size"], v["lr"], v["mixed_precision"]) == (30, 128, 0.0002, "fp16")
    assert v["protocols"] == (["coco_1k_5fold", "coco_5k"] if dataset == "coco" else ["f30k_1k"])
    cap = st["captions"]["params"]["caption_sources"][0]
    assert cap["type"] == "vllm-server"
    assert {k: cap["params"]["sampling"][k] for k in ("temperature", "top_p")} == {"temperature": 0.2, "top_p": 0.9}
    assert v["max_new_tokens"] == 500
    assert [s["params"]["recipe"] for s in (st["stage1"], st["d2s"], st["baseline"])] == [
        "stage1",
        "stage2",
        "baseline",
    ]
    opt = st["d2s"]["params"]["optim"]
    assert (opt["schedule"], opt["decay_epochs"], opt["decay_factor"]) == ("step", [9, 15, 20, 25], 0.3)
    assert st["d2s"]["params"]["data"]["val_split"] == "val"
    assert all(
        st[b]["params"]["split"] == "test" and st[b]["params"]["long_text"] for b in ("bench_baseline", "bench_d2s")
    )

    # the densecap plug-in params with the vars substituted, parsed by the registered classes
    def sub(x):
        if isinstance(x, str) and x.startswith("${vars.") and x.endswith("}"):
            return v[x[7:-1]]
        if isinstance(x, dict):
            return {k: sub(y) for k, y in x.items()}
        if isinstance(x, list):
            return [sub(y) for y in x]
        return x

    p = sub(st["captions"]["params"])
    split_file, image_root = write_fake_karpathy(tmp_path / "data", dataset)
    p["source"]["params"].update(path=str(split_file), image_root=str(image_root))
    src_params = IMAGE_SOURCES.parse_params(p["source"]["type"], p["source"]["params"], "source")
    src = IMAGE_SOURCES.get(p["source"]["type"])(src_params)
    assert sorted((u.split, u.size) for u in src.units()) == sorted(SPLITS.items())
    cp = CAPTION_SOURCES.parse_params(cap["type"], p["caption_sources"][0]["params"], "caption_sources[0]")
    assert (cp.sampling.temperature, cp.sampling.top_p, cp.sampling.max_tokens) == (0.2, 0.9, 500)
    for i, f in enumerate(p["filters"]):
        FILTERS.parse_params(f["type"], f.get("params", {}), f"filters[{i}]")
    for name in ("stage1", "d2s", "baseline"):
        params = sub(
            {**st[name]["params"], "data": sub(st[name]["params"]["data"]), "optim": sub(st[name]["params"]["optim"])}
        )
        tp = from_dict(VseTrainParams, params, f"stages.{name}.params")
        assert (tp.data.batch_size, tp.optim.lr, tp.mixed_precision) == (128, 2e-4, "fp16")


# ---- (b) end to end with tiny stand-ins -------------------------------------------------------


def stand_in_overrides(server_url: str) -> list[str]:
    return [
        f"vars.vllm_url={server_url}",
        "vars.vlm=tiny-llava",
        "vars.prompt_family=llava",
        "vars.max_new_tokens=24",
        "vars.vllm_concurrency=4",
        "vars.caption_workers=1",
        # the tiny VLM writes gibberish: keep one real filter the gibberish can pass
        "captions.params.filters=[{type: length, params: {min_words: 1}}]",
        "vars.model=tiny-vit",
        "vars.stage1_epochs=2",
        "vars.epochs=2",
        "vars.batch_size=4",
        "vars.mixed_precision='no'",
        "vars.val_every_epochs=1",
        "vars.val_max_images=3",
        "vars.loader_workers=0",
        "vars.protocols=[custom]",
    ]


def finite_metrics(results_dir: Path) -> dict:
    doc = json.loads((results_dir / "results.json").read_text())
    assert doc["benchmarks"], doc
    for name, b in doc["benchmarks"].items():
        vals = list(b["metrics"].values())
        assert vals and all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals), (name, b["metrics"])
    return doc["benchmarks"]


E2E_TEST = "test_paper_pipeline_end_to_end_with_stand_ins"


@pytest.fixture(scope="module")
def end_to_end(request, vllm_server, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The end-to-end run of each selected recipe (its finished process and its run dir). The two
    recipes run at the same time: each is mostly one busy process at a time (stage start-ups,
    tiny trainings, requests to the server), so together they keep 2 cores busy."""
    selected = {it.name for it in request.session.items}
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    started = {}
    try:
        for dataset in PIPELINES:
            if f"{E2E_TEST}[{dataset}]" not in selected:
                continue
            tmp = tmp_path_factory.mktemp(f"paper-{dataset}")
            split_file, image_root = write_fake_karpathy(tmp / "data", dataset)
            args = [
                *("run", str(PIPELINES[dataset]), "--run-dir", str(tmp / "run")),
                *data_overrides(split_file, image_root),
                *stand_in_overrides(vllm_server.base_url),
            ]
            cmd = [sys.executable, "-m", "d2s.cli", *args]
            # files, not pipes: neither run waits for its reader
            proc = subprocess.Popen(
                cmd, cwd=tmp, env=env, stdout=open(tmp / "out.txt", "w"), stderr=open(tmp / "err.txt", "w")
            )
            started[dataset] = (proc, cmd, tmp)
        done = {}
        for dataset, (proc, cmd, tmp) in started.items():
            proc.wait(timeout=600)
            out, err = ((tmp / f).read_text() for f in ("out.txt", "err.txt"))
            done[dataset] = (subprocess.CompletedProcess(cmd, proc.returncode, out, err), tmp / "run")
        return done
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["coco", "f30k"])
def test_paper_pipeline_end_to_end_with_stand_ins(dataset, end_to_end):
    r, run_dir = end_to_end[dataset]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]

    # dense captions really came from the served model, for every split
    from d2s.shards import read_samples

    for split, count in SPLITS.items():
        samples = list(read_samples(run_dir / "captions" / "shards", split))
        assert len(samples) == count
        assert all(len(s.sparse) == 5 for s in samples)
        dense = [d for s in samples for d in s.dense]
        assert dense and all(d.model == "tiny-llava" and d.source == "vllm-server" for d in dense), dense[:2]
        assert all(
            d.params["temperature"] == pytest.approx(0.2) and d.params["top_p"] == pytest.approx(0.9) for d in dense
        )

    # stage 2 started from stage 1, every run trained its 2 epochs and chose its checkpoint on val;
    # at batch 4 stage 1's epoch is the 6 training images (1 step), a sparse arm's the 30 captions (7)
    steps = {"stage1": 2 * (SPLITS["train"] // 4), "d2s": 2 * (SPLITS["train"] * 5 // 4)}
    steps["baseline"] = steps["d2s"]
    for stage in ("stage1", "d2s", "baseline"):
        summary = json.loads((run_dir / stage / "run" / "summary.json").read_text())
        assert summary["steps"] == steps[stage] and summary["best_step"] is not None, summary
        cfg = json.loads((run_dir / stage / "run" / "run_config.json").read_text())
        assert cfg["train"]["data"]["val_split"] == "val" and cfg["train"]["optim"]["schedule"] == "step"
    assert json.loads((run_dir / "d2s" / "run" / "run_config.json").read_text())["train"]["init"] == str(
        run_dir / "stage1" / "checkpoint"
    )

    for bench in ("bench_baseline", "bench_d2s"):
        benchmarks = finite_metrics(run_dir / bench / "results")
        assert set(benchmarks) == {"custom", "long_text"}
        assert benchmarks["custom"]["n_images"] == SPLITS["test"]
    report = run_dir / "report" / "report" / "report.md"
    assert report.exists() and "D2S-VSE on" in report.read_text()
