"""Several result files side by side (pandas) and recall@K curves (matplotlib, Agg)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from d2s.atomic import atomic_write_text
from d2s.retrieval import RetrievalInputError

from .api import COLUMNS, BenchResults, fmt_interval
from .intervals import INTERVAL_METRICS, BootstrapSettings, paired_difference
from .manifest import protocol_differences

log = logging.getLogger(__name__)


class ProtocolMismatch(RetrievalInputError):
    """Results measured under different protocols (or on different data) put side by side."""


def check_protocols(runs: Sequence[BenchResults]) -> None:
    """Refuse to compare a benchmark whose runs' manifests disagree on anything but the model;
    the message names the benchmark, the two runs and every field that differs."""
    problems = []
    for bench in dict.fromkeys(b for r in runs for b in r.benchmarks):
        have = [r for r in runs if bench in r.benchmarks]
        ref = have[0]
        for other in have[1:]:
            diffs = protocol_differences(ref.benchmarks[bench].manifest, other.benchmarks[bench].manifest)
            if diffs:
                problems.append(
                    f"{bench}: {ref.name!r} and {other.name!r} were not measured under the same protocol; "
                    + "; ".join(diffs[:8])
                    + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
                )
    if problems:
        raise ProtocolMismatch("refusing to compare: " + " | ".join(problems))


def results_frame(runs: Sequence[BenchResults]):
    """One row per (run, benchmark), one column per metric, plus ``<metric>_low`` / ``_high``."""
    import pandas as pd

    rows = []
    for r in runs:
        for bench, res in r.benchmarks.items():
            row = {"run": r.name, "benchmark": bench, "images": res.n_images, "texts": res.n_texts}
            row.update(res.metrics.to_dict())
            for m in INTERVAL_METRICS:
                iv = res.intervals.get(m)
                row[f"{m}_low"], row[f"{m}_high"] = (iv[0], iv[1]) if iv else (float("nan"), float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


def paired_frame(runs: Sequence[BenchResults], reference: str | None = None):
    """Per benchmark, each run minus the reference run, with the paired bootstrap interval
    (the reference's bootstrap settings; same query indices for both runs)."""
    import pandas as pd

    ref_run = next((r for r in runs if r.name == reference), None) if reference else runs[0]
    if ref_run is None:
        raise RetrievalInputError(f"--reference {reference!r}: no such run; runs: {[r.name for r in runs]}")
    rows = []
    for bench, ref in ref_run.benchmarks.items():
        if ref.query_ranks is None:
            continue
        b = ref.bootstrap or {}
        settings = BootstrapSettings(int(b.get("replicates", 1000)), int(b.get("seed", 0)), float(b.get("level", 0.95)))
        for r in runs:
            other = r.benchmarks.get(bench)
            if r is ref_run or other is None or other.query_ranks is None:
                continue
            d = paired_difference(other.query_ranks, ref.query_ranks, settings)
            row = {"benchmark": bench, "run": r.name, "reference": ref_run.name, "level": settings.level}
            for m in INTERVAL_METRICS:
                row[m], row[f"{m}_low"], row[f"{m}_high"] = d[m]["diff"], d[m]["low"], d[m]["high"]
            rows.append(row)
    return pd.DataFrame(rows)


def _unique_names(runs: Sequence[BenchResults]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name} ({seen[r.name]})"
        else:
            seen[r.name] = 1


def _iv(row, m: str) -> str:
    lo, hi = row[f"{m}_low"], row[f"{m}_high"]
    return "n/a" if lo != lo else fmt_interval([lo, hi])  # NaN: no interval drawn


def compare_markdown(df, runs: Sequence[BenchResults], paired=None) -> str:
    lines = ["# Retrieval comparison", ""]
    for bench in dict.fromkeys(df["benchmark"]):
        sub = df[df["benchmark"] == bench]
        best = sub["rsum"].max()
        lines += [
            f"## {bench}",
            "",
            "| run | " + " | ".join(c[1] for c in COLUMNS) + " | rSum interval |",
            "|---|" + "---|" * (len(COLUMNS) + 1),
        ]
        for _, row in sub.iterrows():
            cells = [f"{row[k]:.2f}" for k, _ in COLUMNS] + [_iv(row, "rsum")]
            name = f"**{row['run']}**" if row["rsum"] == best and len(sub) > 1 else row["run"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        pb = paired[paired["benchmark"] == bench] if paired is not None and len(paired) else []
        if len(pb):
            ref = pb.iloc[0]["reference"]
            level = 100 * pb.iloc[0]["level"]
            lines += [
                f"Paired difference against {ref} ({level:g}% paired bootstrap interval, same queries resampled):",
                "",
                "| run - " + ref + " | " + " | ".join(dict(COLUMNS)[m] for m in INTERVAL_METRICS) + " |",
                "|---|" + "---|" * len(INTERVAL_METRICS),
            ]
            for _, row in pb.iterrows():
                cells = [f"{row[m]:+.2f} {_iv(row, m)}" for m in INTERVAL_METRICS]
                lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
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


def compare(runs: Sequence[BenchResults], out_dir: str | Path, reference: str | None = None) -> dict[str, Path]:
    """Write compare.csv, compare.md, paired.csv and recall_curves.png into ``out_dir``; refuses
    (:class:`ProtocolMismatch`) runs whose manifests disagree on a benchmark's protocol."""
    if not runs:
        raise ValueError("compare needs at least one results file")
    check_protocols(runs)
    _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_frame(runs)
    paired = paired_frame(runs, reference)
    atomic_write_text(out / "compare.csv", df.to_csv(index=False))
    atomic_write_text(out / "paired.csv", paired.to_csv(index=False))
    atomic_write_text(out / "compare.md", compare_markdown(df, runs, paired))
    png = plot_curves(runs, out / "recall_curves.png")
    return {"csv": out / "compare.csv", "paired": out / "paired.csv", "markdown": out / "compare.md", "png": png}
