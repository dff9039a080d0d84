"""The report's training figure: one loss panel per run, each run's own objective terms."""

from bench.report import _curves, _loss_terms


def test_each_run_plots_its_own_terms():
    stage2 = [{"step": i, "loss/triplet": 600.0 - i, "loss/distill": 0.7, "loss/total": 600.7 - i} for i in (10, 20)]
    stage1 = [{"step": i, "loss/triplet_image_dense": 50.0 - i} for i in (10, 20)]
    assert _loss_terms(stage2) == ["loss/distill", "loss/triplet", "loss/total"]
    assert _loss_terms(stage1) == ["loss/triplet_image_dense"]  # one term: no separate total
    assert _loss_terms([{"step": 1, "loss/total": 3.0}]) == ["loss/total"]


def test_curves_figure_has_a_panel_per_run(tmp_path):
    from PIL import Image

    hist = {
        "stage 1": [{"step": s, "loss/a": 5.0 / s, "val/rsum": 10.0 * s} for s in (1, 2, 3)],
        "stage 2": [{"step": s, "loss/b": 500.0 / s, "loss/c": 0.5, "loss/total": 500.5 / s} for s in (1, 2, 3)],
    }
    out = _curves(hist, tmp_path / "c.png")
    w, h = Image.open(out).size
    one = _curves({"stage 1": hist["stage 1"]}, tmp_path / "one.png")
    # three panels (two runs + validation) are wider than two (one run + validation)
    assert w > Image.open(one).size[0] * 1.3 and h > 200


def test_report_table_has_rsum_intervals_and_paired_differences():
    import numpy as np
    import torch

    from bench.api import Embeddings, RetrievalSettings, evaluate_embeddings
    from bench.report import _table

    rng = np.random.default_rng(0)
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(12, 6)).astype(np.float32)), dim=1)
    txt = img.repeat_interleave(2, 0) + torch.from_numpy(rng.normal(scale=1.0, size=(24, 6)).astype(np.float32))
    s = RetrievalSettings(long_text=False, bootstrap=300)
    a = evaluate_embeddings(Embeddings(img, txt, torch.arange(24) // 2), s)["custom"]
    perfect = evaluate_embeddings(Embeddings(img, img.repeat_interleave(2, 0), torch.arange(24) // 2), s)["custom"]
    lines = _table({"A": a, "A again": a, "perfect": perfect}, "note.")
    lo, hi = a.intervals["rsum"]
    assert lines[2].endswith(f"| [{lo:.1f}, {hi:.1f}] |")  # the first model's row ends with its interval
    assert lines[5].startswith("| A again - A |") and lines[5].endswith("| [+0.0, +0.0] |")  # identical: zero
    assert perfect.metrics.rsum == 600 and a.metrics.rsum < 600
    d = lines[6].split(" | ")[-1].strip(" |[]").split(", ")
    assert lines[6].startswith("| perfect - A |") and float(d[0]) >= 0  # never below A on any resample
    assert "paired" in lines[-2]


def test_report_stage_reads_bench_results_with_intervals(tmp_path, monkeypatch):
    """bench-retrieval twice (a colour stand-in for the model) and the report stage through the runner."""
    import bench.stages
    from d2s.pipeline import Runner, load_pipeline
    from tests.bench.test_bench_cli import ColorEncoder, write_shards

    write_shards(tmp_path / "shards", n=10)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "model.safetensors").write_bytes(b"stand-in")
    monkeypatch.setattr(bench.stages, "load_encoder", lambda path, device=None: ColorEncoder())
    ev = {
        "type": "bench-retrieval",
        "params": {"bootstrap": 200},
        "inputs": {"bundle": str(tmp_path / "bundle"), "shards": str(tmp_path / "shards")},
    }
    doc = {
        "stages": {
            "bench_baseline": ev,
            "bench_d2s": ev,
            "report": {
                "type": "report",
                "params": {"examples": 2},
                "inputs": {
                    "baseline": "${bench_baseline.results}",
                    "d2s": "${bench_d2s.results}",
                    "shards": str(tmp_path / "shards"),
                },
            },
        }
    }
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    Runner(p).run()
    report = (p.stage("report").outputs["report"] / "report.md").read_text()
    assert "| model | i2t R@1 |" in report and "rSum interval |" in report
    # the same stand-in twice: the paired difference and its interval are exactly zero
    assert (
        "| D2S-VSE - align only (baseline) | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | [+0.0, +0.0] |" in report
    )
    assert "## Examples" in report
