"""The ablation experiment end to end on a tiny budget: two seeds sharing one world, seven arms,
the head arms under both compositions, the table with paired intervals."""

import json
from pathlib import Path

import pytest

from experiments import ablation

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "world.params.train=128",
    "world.params.val=32",
    "world.params.test=32",
    "world.params.shard_size=128",
    "captions.params.num_workers=1",  # in the stage's process: no pool of processes to start
    "vars.dense_steps=3",
    "vars.sparse_steps=3",
    "stage1.params.data.batch_size=32",
    "stage1.params.data.val_max_images=32",
]


def test_two_seeds_seven_arms_both_compositions(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--seeds", "0", "1", "--runs", str(runs), "--results", str(results), "--set", *TINY]
    assert ablation.main(argv) == 0
    # the second seed reused the first seed's data stages (linked, found cached)
    assert (runs / "seed-1" / "world").is_symlink()
    assert "stage world: cached" in (runs / "seed-1.log").read_text()
    doc = json.loads((results / "summary.json").read_text())
    assert doc["seeds"] == [0, 1]
    arms = set(doc["table"])
    assert arms == {
        "pretrain_only",
        "baseline",
        "pretrain_align",
        "align_distill",
        "align_distill/raw",
        "d2s",
        "d2s/raw",
        "head_only",
        "head_only/raw",
        "distill_only",
    }
    # figures come from the stages' own files: the raw arm's test rSum is bench_d2s_raw's
    for seed in (0, 1):
        res = json.loads((runs / f"seed-{seed}" / "bench_d2s_raw" / "results" / "results.json").read_text())
        assert (
            doc["table"]["d2s/raw"]["test sparse"]["per_seed"][seed] == res["benchmarks"]["custom"]["metrics"]["rsum"]
        )
        summary = json.loads((runs / f"seed-{seed}" / "d2s" / "run" / "summary.json").read_text())
        assert doc["table"]["d2s/raw"]["val sparse"]["per_seed"][seed] == summary["compositions"]["raw"]["best_rsum"]
    # align + distill started where stage 1 started (no init) and distilled stage 1's text encoder
    cfg = json.loads((runs / "seed-0" / "align_distill" / "run" / "run_config.json").read_text())["train"]
    assert cfg["init"] is None and cfg["teacher"] == str(runs / "seed-0" / "stage1" / "checkpoint")
    # each difference is paired: the mean of the per-seed differences to pre-training + align
    d2s, ref = doc["table"]["d2s"]["test sparse"]["per_seed"], doc["table"]["pretrain_align"]["test sparse"]["per_seed"]
    mean = doc["table"]["d2s"]["test sparse"]["minus_reference"][0]
    assert mean == pytest.approx((d2s[0] - ref[0] + d2s[1] - ref[1]) / 2)
    text = (results / "summary.md").read_text()
    assert "| full (D2S-VSE), raw head |" in text and "head_pairwise_cos" in text
    for arm in ablation.HEAD_ARMS:
        m = doc["mechanism"][arm]
        assert all(h > 0 for h in m["head_norm_train"]) and all(-1 <= c <= 1 for c in m["head_pairwise_cos"])
