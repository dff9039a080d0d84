"""Several result files side by side (pandas) and recall@K curves (matplotlib, Agg)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from d2s.atomic import atomic_write_text

from .api import COLUMNS, BenchResults

log = logging.getLogger(__name__)


def results_frame(runs: Sequence[BenchResults]):
    """One row per (run, benchmark), one column per metric."""
    import pandas as pd

    rows = []
    for r in runs:
        for bench, res in r.benchmarks.items():
            rows.append(
                {
                    "run": r.name,
                    "benchmark": bench,
                    "images": res.n_images,
                    "texts": res.n_texts,
                    **res.metrics.to_dict(),
                }
            )
    return pd.DataFrame(rows)


def _unique_names(runs: Sequence[BenchResults]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name} ({seen[r.name]})"
        else:
            seen[r.name] = 1


def compare_markdown(df, runs: Sequence[BenchResults]) -> str:
    lines = ["# Retrieval comparison", ""]
    for bench in dict.fromkeys(df["benchmark"]):
        sub = df[df["benchmark"] == bench]
        best = sub["rsum"].max()
        lines += [
            f"## {bench}",
            "",
            "| run | " + " | ".join(c[1] for c in COLUMNS) + " |",
            "|---|" + "---|" * len(COLUMNS),
        ]
        for _, row in sub.iterrows():
            cells = [f"{row[k]:.2f}" for k, _ in COLUMNS]
            name = f"**{row['run']}**" if row["rsum"] == best and len(sub) > 1 else row["run"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(runs: Sequence[BenchResults], path: str | Path) -> Path:
    """Recall@K against K (log scale), one row of panels (i2t, t2i) per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(b for r in runs for b in r.benchmarks))
    fig, axes = plt.subplots(len(benches), 2, figsize=(10, 3.6 * len(benches)), squeeze=False)
    for row, bench in enumerate(benches):
        for col, direction in enumerate(("i2t", "t2i")):
            ax = axes[row][col]
            for r in runs:
                res = r.benchmarks.get(bench)
                if res is None or direction not in res.curves:
                    continue
                ks = sorted(res.curves[direction])
                ax.plot(ks, [res.curves[direction][k] for k in ks], marker="o", label=r.name)
            ax.set_xscale("log")
            ax.set_xlabel("K")
            ax.set_ylabel("recall@K (%)")
            ax.set_ylim(0, 101)
            ax.set_title(f"{bench}: {'image->text' if direction == 'i2t' else 'text->image'}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def compare(runs: Sequence[BenchResults], out_dir: str | Path) -> dict[str, Path]:
    """Write compare.csv, compare.md and recall_curves.png into ``out_dir``."""
    if not runs:
        raise ValueError("compare needs at least one results file")
    _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_frame(runs)
    atomic_write_text(out / "compare.csv", df.to_csv(index=False))
    atomic_write_text(out / "compare.md", compare_markdown(df, runs))
    png = plot_curves(runs, out / "recall_curves.png")
    return {"csv": out / "compare.csv", "markdown": out / "compare.md", "png": png}
