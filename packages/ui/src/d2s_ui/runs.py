"""Bench results side by side: one table per benchmark, recall@K curves, and each run minus a
reference run (D2S-VSE when there is one, as the report's paired differences; else the first)."""

from __future__ import annotations

from typing import Any

from bench.api import COLUMNS, read_results
from d2s.retrieval import RetrievalInputError

from .config import Named, UIError

REFERENCE_NAMES = ("bench_d2s", "d2s")  # the quickstart's names of D2S-VSE's results


def runs_view(results: list[Named], reference: str = "") -> dict[str, Any]:
    runs, problems = [], []
    for n in results:
        try:
            runs.append((n.name, read_results(n.path)))
        except (FileNotFoundError, RetrievalInputError) as exc:
            problems.append(f"results {n.name}: {exc}")
    names = [name for name, _ in runs]
    if reference and reference not in names:
        raise UIError(f"reference {reference!r}: not one of the runs ({', '.join(names)})", 404)
    if not reference and names:  # D2S-VSE as in the report's paired differences, when the run has it
        reference = next((n for n in names if n in REFERENCE_NAMES), names[0])
    benches: dict[str, dict[str, Any]] = {}
    for name, r in runs:
        for bench, res in r.benchmarks.items():
            b = benches.setdefault(bench, {"rows": [], "curves": {}, "differences": []})
            m = res.metrics.to_dict()
            b["rows"].append(
                {"run": name, "images": res.n_images, "texts": res.n_texts, **{k: round(m[k], 2) for k, _ in COLUMNS}}
            )
            for direction, curve in res.curves.items():
                ks = sorted(curve)
                b["curves"].setdefault(direction, []).append({"run": name, "k": ks, "recall": [curve[k] for k in ks]})
    for b in benches.values():
        ref = next((row for row in b["rows"] if row["run"] == reference), None)
        if ref is None:
            continue
        for row in b["rows"]:
            if row["run"] != reference:
                b["differences"].append(
                    {"run": f"{reference} - {row['run']}", **{k: round(ref[k] - row[k], 2) for k, _ in COLUMNS}}
                )
    return {
        "columns": [{"key": k, "label": label} for k, label in COLUMNS],
        "runs": names,
        "reference": reference,
        "benchmarks": benches,
        "problems": problems,
    }
