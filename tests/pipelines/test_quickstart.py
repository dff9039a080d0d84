"""The quickstart pipeline end to end on a tiny budget, then a rerun that hits every cache."""

import json
import math
from pathlib import Path

import pytest

from d2s.cli import main as d2s_main
from d2s.pipeline import Runner, load_pipeline

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # every test shares one (tiny) quickstart run

QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
TINY = [
    "world.params.train=256",
    "world.params.val=64",
    "world.params.test=64",
    "world.params.shard_size=128",
    "captions.params.num_workers=1",  # in this process: no pool of processes to start
    "vars.dense_steps=4",
    "vars.sparse_steps=4",
    "stage1.params.data.batch_size=32",
    "stage1.params.data.val_max_images=64",
    "stage1.params.threads=1",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qs") / "run"
    argv = ["run", str(QUICKSTART), "--run-dir", str(run_dir), *TINY]
    assert d2s_main(argv) == 0
    return run_dir, argv


def test_report_has_tables_for_every_model(quickstart_run):
    run_dir, _ = quickstart_run
    report = (run_dir / "report" / "report" / "report.md").read_text()
    for heading in (
        "## Sparse-caption retrieval",
        "## Long-text retrieval",
        "## Training",
        "## Dense captions",
        "## Examples",
    ):
        assert heading in report
    for row in (
        "| align only (baseline) |",
        "| pre-training only |",
        "| pre-training + align |",
        "| D2S-VSE |",
        "| D2S-VSE, raw head |",
        "| D2S-VSE - align only (baseline) |",
    ):
        assert row in report
    assert (run_dir / "report" / "report" / "training_curves.png").stat().st_size > 1000
    assert list((run_dir / "report" / "report").glob("example_*.png"))


def test_report_shows_the_paired_difference_of_its_run(quickstart_run):
    run_dir, _ = quickstart_run
    report = (run_dir / "report" / "report" / "report.md").read_text()
    assert "## Paired difference of this run" in report and "docs/experiments.md" in report
    rsum = {
        name: json.loads((run_dir / f"bench_{name}" / "results" / "results.json").read_text())["benchmarks"]["custom"][
            "metrics"
        ]["rsum"]
        for name in ("baseline", "pretrain_only", "pretrain_align", "d2s", "d2s_raw")
    }
    row = next(ln for ln in report.splitlines() if ln.startswith("| test, custom |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    for cell, other in zip(cells, ("baseline", "pretrain_only", "pretrain_align", "d2s_raw"), strict=True):
        assert float(cell) == pytest.approx(rsum["d2s"] - rsum[other], abs=0.051)


def test_d2s_is_evaluated_under_both_compositions_of_its_head(quickstart_run):
    run_dir, _ = quickstart_run
    from vse.bundle import load_bundle

    summary = json.loads((run_dir / "d2s" / "run" / "summary.json").read_text())
    for comp in ("l2", "raw"):
        bundle = load_bundle(run_dir / "d2s" / "run" / f"bundle-{comp}")
        assert bundle.model.cfg.student.combine_eval == comp
        assert summary["compositions"][comp]["best_rsum"] is not None
    # the reference's own choice is the l2 one, and bench_d2s_raw measured the raw bundle
    assert summary["best_step"] == summary["compositions"]["l2"]["best_step"]
    res = json.loads((run_dir / "bench_d2s_raw" / "results" / "results.json").read_text())
    assert Path(res["source"]["bundle"]).resolve() == (run_dir / "d2s" / "run" / "bundle-raw").resolve()
    # the report's val row: D2S-VSE (l2) minus the raw head, from the two selections
    report = (run_dir / "report" / "report" / "report.md").read_text()
    row = next(ln for ln in report.splitlines() if ln.startswith("| val, sparse (best checkpoint) |"))
    last = [c.strip() for c in row.strip("|").split("|")][-1]
    raw = summary["compositions"]["raw"]["best_rsum"]
    assert float(last) == pytest.approx(summary["best_rsum"] - raw, abs=0.051)


def test_report_names_what_produced_it(quickstart_run):
    import re
    from importlib import metadata

    run_dir, _ = quickstart_run
    out = run_dir / "report" / "report"
    report = (out / "report.md").read_text()
    assert "## Run" in report
    # the pipeline config as it ran, next to the report
    assert (out / "pipeline.resolved.yaml").read_text() == (run_dir / "resolved.yaml").read_text()
    for stage in ("stage1", "d2s"):
        cfg = json.loads((run_dir / stage / "run" / "run_config.json").read_text())["train"]
        assert f"recipe `{cfg['recipe']}`, seed {cfg['seed']}" in report
    assert f"torch {metadata.version('torch')}" in report and f"d2s-vse {metadata.version('d2s-vse')}" in report
    # every rSum in the training lines is printed to one decimal (no float noise)
    best = re.findall(r"best val rSum (\S+)", report)
    assert best and all(re.fullmatch(r"\d+\.\d", b) for b in best), best


def test_bench_results_are_finite_and_on_the_test_split(quickstart_run):
    run_dir, _ = quickstart_run
    for name in ("bench_baseline", "bench_pretrain_only", "bench_pretrain_align", "bench_d2s", "bench_d2s_raw"):
        res = json.loads((run_dir / name / "results" / "results.json").read_text())
        assert res["source"]["split"] == "test"
        custom = res["benchmarks"]["custom"]
        assert custom["n_images"] == 64 and custom["n_texts"] == 320
        m = custom["metrics"]
        assert all(math.isfinite(v) for v in m.values())
        assert m["rsum"] == pytest.approx(sum(m[k] for k in m if k[4:5] == "r" and k[5:].isdigit()))


def test_d2s_stage_was_initialised_from_stage1_and_distilled(quickstart_run):
    run_dir, _ = quickstart_run
    cfg = json.loads((run_dir / "d2s" / "run" / "run_config.json").read_text())
    assert cfg["train"]["recipe"] == "stage2" and cfg["train"]["init"] == str(run_dir / "stage1" / "checkpoint")
    history = [json.loads(ln) for ln in (run_dir / "d2s" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("loss/") and "distill" in k for row in history for k in row)


def test_rerun_is_fully_cached(quickstart_run):
    run_dir, argv = quickstart_run
    p = load_pipeline(QUICKSTART, TINY, run_dir=run_dir)
    report = Runner(p).run(dry_run=True)
    assert {r["action"] for r in report} == {"skip"}
    # a changed seed reruns training and everything after it, not the data stages
    p = load_pipeline(QUICKSTART, TINY + ["vars.seed=1"], run_dir=run_dir)
    actions = {r["stage"]: r["action"] for r in Runner(p).run(dry_run=True)}
    assert actions["world"] == actions["captions"] == actions["assets"] == "skip"
    assert actions["stage1"] == actions["d2s"] == actions["report"] == "run"


def _outcome(run_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Every weight file of the training stages (SHA-256) and every bench metric of a run."""
    import hashlib

    weights = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.glob("*/**/*.safetensors"))
        if p.relative_to(run_dir).parts[0] not in ("world", "captions", "assets")
    }
    metrics = {}
    for res in sorted(run_dir.glob("bench_*/results/results.json")):
        for bench, r in json.loads(res.read_text())["benchmarks"].items():
            for k, v in r["metrics"].items():
                metrics[f"{res.parts[-3]}/{bench}/{k}"] = v
    return weights, metrics


def test_jobs_2_gives_the_weights_and_results_of_one_stage_at_a_time(quickstart_run, tmp_path):
    """scripts/quickstart.sh runs the stages with --jobs 2 (d2s.stage_pool); the module's run is
    one stage at a time."""
    run_dir, argv = quickstart_run
    one_at_a_time = _outcome(run_dir)
    assert len(one_at_a_time[0]) >= 8 and len(one_at_a_time[1]) >= 20  # four trainings, five benches
    other = tmp_path / "jobs2"
    assert d2s_main([*argv[:3], str(other), *argv[4:], "--jobs", "2"]) == 0
    log = sorted((other / "logs").glob("*.log"))[-1].read_text()
    assert "[baseline] " in log and "[stage1] " in log  # the trainings ran in stage processes
    assert _outcome(other) == one_at_a_time
