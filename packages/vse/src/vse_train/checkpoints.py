"""The model checkpoints and inference bundles a run keeps (``vse.checkpoint`` layout):
``last/``, ``best/`` (under the model's own evaluation composition), ``best-<c>/`` (under each
of ``compositions``), and the bundles exported from them."""

from __future__ import annotations

from pathlib import Path

from d2s.config import to_dict
from vse.checkpoint import save_checkpoint
from vse.models import evaluation_composition

from .build import Run


def save_model(run: Run, path: Path, step: int, metrics: dict | None = None) -> None:
    """A model checkpoint (``vse.checkpoint`` layout) of the current weights."""
    extra = {"recipe": to_dict(run.recipe), "train": to_dict(run.cfg), "step": step, "metrics": metrics or {}}
    save_checkpoint(path, run.unwrapped, tokenizer=run.parts.hf_tokenizer, processor=run.parts.processor, extra=extra)


def result_dir(out: Path, composition: str | None = None) -> Path:
    """The checkpoint a run's result is (under ``composition``): its best on val, else its last."""
    name = "best" if composition is None else f"best-{composition}"
    if (out / name).exists():
        return out / name
    return out / ("last" if composition is None else f"last-{composition}")


def export_bundles(run: Run, step: int) -> None:
    """``bundle/`` from the result checkpoint, and ``bundle-<c>/`` for each composition (a run
    without validation saves the last weights under that composition as ``last-<c>/``)."""
    from vse.bundle import export_bundle

    export_bundle(result_dir(run.out), run.out / "bundle")
    for comp in run.cfg.compositions:
        if not (run.out / f"best-{comp}").exists():
            with evaluation_composition(run.unwrapped, comp):
                save_model(run, run.out / f"last-{comp}", step, None)
        export_bundle(result_dir(run.out, comp), run.out / f"bundle-{comp}")
