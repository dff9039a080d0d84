"""The quickstart with stages at once (``--jobs 2``, as scripts/quickstart.sh runs it) trains and
measures exactly what it does one stage at a time."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from d2s.cli import main as d2s_main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "world.params.train=256",
    "world.params.val=64",
    "world.params.test=64",
    "world.params.shard_size=128",
    "vars.dense_steps=6",
    "vars.sparse_steps=6",
    "stage1.params.data.batch_size=32",
    "stage1.params.data.val_max_images=64",
]
DATA = ("world", "captions", "assets")


def outcome(run_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Every weight file of the training stages (SHA-256) and every bench metric."""
    weights = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.glob("*/**/*.safetensors"))
        if p.relative_to(run_dir).parts[0] not in DATA
    }
    metrics = {}
    for res in sorted(run_dir.glob("bench_*/results/results.json")):
        for bench, r in json.loads(res.read_text())["benchmarks"].items():
            for k, v in r["metrics"].items():
                metrics[f"{res.parts[-3]}/{bench}/{k}"] = v
    return weights, metrics


def test_jobs_2_gives_the_weights_and_results_of_jobs_1(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["run", str(ROOT / "pipelines" / "quickstart.yaml"), "--run-dir", str(run_dir), *TINY]
    assert d2s_main(argv) == 0
    one_at_a_time = outcome(run_dir)
    assert len(one_at_a_time[0]) >= 8 and len(one_at_a_time[1]) >= 20  # four trainings, five benches
    for d in run_dir.iterdir():
        if d.is_dir() and d.name not in (*DATA, "logs"):
            shutil.rmtree(d)
    assert d2s_main([*argv, "--jobs", "2"]) == 0
    log = next(iter(sorted((run_dir / "logs").glob("*.log"))[-1:])).read_text()
    assert "[baseline] " in log and "[stage1] " in log  # the trainings ran in stage processes
    assert outcome(run_dir) == one_at_a_time
