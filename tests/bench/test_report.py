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
