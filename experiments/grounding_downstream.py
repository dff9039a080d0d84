"""The downstream grounding experiment of docs/experiments.md: what false sentences in the
dense text cost D2S-VSE, and how much a grounding repair wins back (issue 22, item 5).

Runs ``pipelines/grounding_downstream.yaml`` once per seed (``<runs>/seed-<S>``; the world,
captions, scorer and repair are the same for every seed, so each run dir rebuilds the same
ones), then reports, on val (checkpoint choice, sparse captions) and test (sparse captions,
and long text: image <-> the exact dense descriptions):

- rSum mean +- sd of the three arms (exact, planted = 30% false sentences, repaired);
- paired per-seed differences with 95% t intervals: planted - exact (the cost of the false
  sentences) and repaired - planted (what the repair wins back), and repaired - exact;
- what the repair removed, against the planted truth: the share of false sentences removed
  (per kind) and the share of removed sentences that were false.

    .venv/bin/python experiments/grounding_downstream.py --seeds 0 1 2 [--parallel 3] [--report-only]

Figures per seed go to ``experiments/results/grounding_downstream/seed-<S>.json`` (small,
committed); the table to ``summary.md`` / ``summary.json`` there, and is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.seeds import run_seed, stage_outputs  # noqa: E402
from experiments.stats import fmt_interval, mean_sd, paired_interval  # noqa: E402

ARMS = {"exact": "exact", "planted": "30% false", "repaired": "repaired"}
DIFFS = (("planted", "exact"), ("repaired", "planted"), ("repaired", "exact"))
ROWS = (
    ("val", "custom", "val, sparse captions (best checkpoint)"),
    ("test", "custom", "test, sparse captions"),
    ("test", "long_text", "test, long text (image <-> exact dense text)"),
)


def repair_figures(repaired_shards: Path) -> dict:
    """What the repair removed from the train split, against each sentence's planted truth."""
    from d2s.shards import read_samples

    removed, kept = Counter(), Counter()
    for s in read_samples(repaired_shards, "train"):
        for d in s.dense:
            truth = {t.text: t.label for t in d.truth}
            for sent in d.sentences:
                label = truth.get(sent.text, "unmatched")
                (removed if sent.removed else kept)[label] += 1
    false_removed = sum(v for k, v in removed.items() if k not in ("true", "unmatched"))
    false_total = false_removed + sum(v for k, v in kept.items() if k not in ("true", "unmatched"))
    kinds = sorted(k for k in set(removed) | set(kept) if k not in ("true", "unmatched"))
    return {
        "sentences": sum(removed.values()) + sum(kept.values()),
        "removed": sum(removed.values()),
        "false_total": false_total,
        "false_removed_share": false_removed / max(1, false_total),
        "true_removed_share": removed["true"] / max(1, removed["true"] + kept["true"]),
        "removed_that_were_false": false_removed / max(1, sum(removed.values())),
        "unmatched": removed["unmatched"] + kept["unmatched"],
        "removed_share_by_kind": {k: removed[k] / max(1, removed[k] + kept[k]) for k in kinds},
    }


def collect(run_dir: Path, with_repair: bool) -> dict:
    out: dict = {"val": {}, "test": {}}
    for arm in ARMS:
        summary = json.loads((Path(stage_outputs(run_dir, f"d2s_{arm}")["run"]) / "summary.json").read_text())
        out["val"][arm] = {"custom": summary["best_rsum"]}
        res = json.loads((Path(stage_outputs(run_dir, f"bench_{arm}")["results"]) / "results.json").read_text())
        out["test"][arm] = {name: b["metrics"]["rsum"] for name, b in res["benchmarks"].items()}
    if with_repair:
        out["repair"] = repair_figures(Path(stage_outputs(run_dir, "repaired")["shards"]))
    return out


def report(per_seed: dict[int, dict]) -> tuple[dict, str]:
    seeds = sorted(per_seed)
    head = [ARMS[a] for a in ARMS] + [f"{ARMS[a]} - {ARMS[b]}" for a, b in DIFFS]
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); rSum out of 600, mean +- sd; differences: "
        "mean [95% Student t interval] over the paired per-seed differences.",
        "",
        "| split, task | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    table: dict = {}
    for split, bench, label in ROWS:
        vals = {a: [per_seed[s][split][a][bench] for s in seeds] for a in ARMS}
        cells = ["{:.1f} +- {:.1f}".format(*mean_sd(v)) for v in vals.values()]
        diffs = {}
        for a, b in DIFFS:
            d = [x - y for x, y in zip(vals[a], vals[b])]
            m, lo, hi = paired_interval(d)
            diffs[f"{a}-{b}"] = {"mean": m, "ci95": [lo, hi], "per_seed": d}
            cells.append(fmt_interval(m, lo, hi))
        table[f"{split}/{bench}"] = {"per_arm": vals, "diffs": diffs}
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rep = per_seed[seeds[0]].get("repair")
    if rep:
        lines += [
            "",
            f"The repair (train split, {rep['sentences']} sentences): removed {rep['removed']}; "
            f"{100 * rep['false_removed_share']:.1f}% of the {rep['false_total']} false sentences and "
            f"{100 * rep['true_removed_share']:.1f}% of the true ones; "
            f"{100 * rep['removed_that_were_false']:.1f}% of what it removed was false.",
            "",
            "| kind | share removed |",
            "|---|---|",
        ] + [f"| {k} | {100 * v:.1f}% |" for k, v in rep["removed_share_by_kind"].items()]
    return {"seeds": seeds, "table": table, "repair": rep, "per_seed": per_seed}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "grounding_downstream")
    ap.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "grounding_downstream.yaml")
    ap.add_argument("--parallel", type=int, default=3, help="seeds run at once (each trains with one thread)")
    ap.add_argument("--report-only", action="store_true", help="no training: collect the finished runs")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "grounding_downstream")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pipeline overrides for every seed")
    a = ap.parse_args(argv)
    runs = a.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        with ThreadPoolExecutor(a.parallel) as ex:
            rcs = dict(zip(a.seeds, ex.map(lambda s: run_seed(s, runs, a.pipeline, a.set), a.seeds)))
        failed = {s: rc for s, rc in rcs.items() if rc}
        if failed:
            print(f"seeds failed: {failed}; see {runs}/seed-<S>.log", file=sys.stderr)
            return 1
    a.results.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for i, s in enumerate(a.seeds):
        run_dir, saved = runs / f"seed-{s}", a.results / f"seed-{s}.json"
        if (run_dir / "bench_repaired" / "stage.json").exists():
            per_seed[s] = collect(run_dir, with_repair=i == 0)
            saved.write_text(json.dumps(per_seed[s], indent=1) + "\n")
        elif saved.exists():
            per_seed[s] = json.loads(saved.read_text())
        else:
            print(f"seed {s}: no finished run in {run_dir} and no {saved}", file=sys.stderr)
            return 1
    doc, text = report(per_seed)
    (a.results / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.results / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
