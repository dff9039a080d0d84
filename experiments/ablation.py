"""The stage-2 ablation of docs/experiments.md (issue 18): the paper's five rows and two arms
that split stage 2, each arm with a student head under both compositions of its output.

Runs ``pipelines/ablation.yaml`` once per seed (``<runs>/seed-<S>``; the world, captions and
assets of the first seed are linked into the others, so every seed's arms start from the same
data and backbones), then reports, for each arm (and composition), on val (the checkpoint
choice, sparse captions) and on test (sparse captions; long text: image <-> dense text):

- rSum mean +- sd over seeds;
- the paired per-seed difference to pre-training + align, with a 95% Student t interval;
- mechanism figures of the head arms: the norm of the student head's output h next to the
  caption embedding c it is added to (train mode, as in training, and eval mode), the ratio
  |h| / |c| in training against 1 / |c| at evaluation under l2, and the mean pairwise cosine
  of h over test captions.

    .venv/bin/python experiments/ablation.py --seeds 0 1 2 3 4 [--parallel 2] [--report-only]

Each seed's figures go to ``experiments/results/ablation/seed-<S>.json``; the table to
``summary.md`` / ``summary.json`` there, and is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.seeds import run_seed, stage_outputs  # noqa: E402
from experiments.stats import fmt_interval, mean_sd, paired_interval  # noqa: E402

SHARED = ("world", "captions", "assets")
# arm -> (label, training stage or None, {composition: bench stage}); l2 is the reference's
ARMS = {
    "pretrain_only": ("pre-training only", None, {"l2": "bench_pretrain_only"}),
    "baseline": ("align only", "baseline", {"l2": "bench_baseline"}),
    "pretrain_align": ("pre-training + align", "pretrain_align", {"l2": "bench_pretrain_align"}),
    "align_distill": (
        "align + distill",
        "align_distill",
        {"l2": "bench_align_distill", "raw": "bench_align_distill_raw"},
    ),
    "d2s": ("full (D2S-VSE)", "d2s", {"l2": "bench_d2s", "raw": "bench_d2s_raw"}),
    "head_only": (
        "stage 2, head without distill",
        "head_only",
        {"l2": "bench_head_only", "raw": "bench_head_only_raw"},
    ),
    "distill_only": ("stage 2, distill without head", "distill_only", {"l2": "bench_distill_only"}),
}
REFERENCE = "pretrain_align"
HEAD_ARMS = ("align_distill", "d2s", "head_only")
ROWS = (("val", "custom", "val sparse"), ("test", "custom", "test sparse"), ("test", "long_text", "test long text"))


@torch.no_grad()
def sparse_val_rsum(bundle_dir: Path, shards: Path) -> float:
    """The bundle's rSum on the val split's sparse captions (pre-training only has no sparse
    validation of its own: stage 1 chose its checkpoint on dense text)."""
    from d2s.retrieval import retrieval_metrics
    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    b = load_bundle(bundle_dir)
    val = read_samples(shards, "val")
    caps = [c for s in val for c in s.sparse]
    owner = torch.tensor([i for i, s in enumerate(val) for _ in s.sparse])
    return float(retrieval_metrics(b.embed_images([s.image for s in val]), b.embed_texts(caps), owner).rsum)


@torch.no_grad()
def head_figures(bundle_dir: Path, shards: Path) -> dict[str, float]:
    """|c| and |h| over the test captions, in train mode (as in training) and eval mode, and
    the mean pairwise cosine of h (eval mode)."""
    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    b = load_bundle(bundle_dir)
    m = b.model
    caps = [c for s in read_samples(shards, "test") for c in s.sparse]
    out: dict[str, float] = {}
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        m.train(mode == "train")
        cs, hs = [], []
        for i in range(0, len(caps), 256):
            ids, mask = b.tokenizer(caps[i : i + 256], m.cfg.text.max_length)
            cs.append(m.text(ids, mask, None, normalize=False).float())
            hs.append(m.student(m.text.word_features(ids, mask.bool()), mask.bool()).float())
        c, h = torch.cat(cs), torch.cat(hs)
        out[f"caption_norm_{mode}"] = float(c.norm(dim=1).mean())
        out[f"head_norm_{mode}"] = float(h.norm(dim=1).mean())
        out[f"head_to_caption_{mode}"] = float((h.norm(dim=1) / c.norm(dim=1)).mean())
        if mode == "eval":
            out["head_to_caption_eval_l2"] = float((1 / c.norm(dim=1)).mean())
            u = torch.nn.functional.normalize(h, dim=-1)
            n = u.shape[0]
            out["head_pairwise_cos"] = float((u.sum(0).pow(2).sum() - n) / (n * (n - 1)))
    m.eval()
    return out


def collect(run_dir: Path) -> dict:
    shards = Path(stage_outputs(run_dir, "captions")["shards"])
    out: dict = {"val": {}, "test": {}, "mechanism": {}}
    for arm, (_, stage, benches) in ARMS.items():
        summary = (
            json.loads((Path(stage_outputs(run_dir, stage)["run"]) / "summary.json").read_text()) if stage else None
        )
        for comp, bench in benches.items():
            key = arm if comp == "l2" else f"{arm}/raw"
            res = json.loads((Path(stage_outputs(run_dir, bench)["results"]) / "results.json").read_text())
            out["test"][key] = {name: b["metrics"]["rsum"] for name, b in res["benchmarks"].items()}
            if summary is None:
                val = sparse_val_rsum(Path(stage_outputs(run_dir, "stage1")["bundle"]), shards)
            elif comp == "l2":
                val = summary["best_rsum"]
            else:
                val = summary["compositions"][comp]["best_rsum"]
            out["val"][key] = {"custom": val}
        if arm in HEAD_ARMS:
            out["mechanism"][arm] = head_figures(Path(stage_outputs(run_dir, stage)["bundle"]), shards)
    return out


def report(per_seed: dict[int, dict]) -> tuple[dict, str]:
    seeds = sorted(per_seed)
    keys = [k for arm, (_, _, b) in ARMS.items() for k in ([arm] + ([f"{arm}/raw"] if "raw" in b else []))]
    label = {k: ARMS[k.split("/")[0]][0] + (", raw head" if k.endswith("/raw") else "") for k in keys}
    ref = ARMS[REFERENCE][0]
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); rSum out of 600, mean +- sd; differences to "
        f"{ref}: mean [95% Student t interval] over the paired per-seed differences. Arms with a student "
        "head: l2 (the reference's evaluation) and, on the 'raw head' line, raw (as in training), each "
        "with its own checkpoint chosen on val under it.",
        "",
        "| arm | " + " | ".join(r[2] for r in ROWS) + " | " + " | ".join(f"{r[2]} - {ref}" for r in ROWS) + " |",
        "|---|" + "---|" * (2 * len(ROWS)),
    ]
    table: dict = {}
    for k in keys:
        cells, diffs = [], []
        for split, bench, name in ROWS:
            v = [per_seed[s][split][k][bench] for s in seeds]
            r = [per_seed[s][split][REFERENCE][bench] for s in seeds]
            cells.append("{:.1f} +- {:.1f}".format(*mean_sd(v)))
            m, lo, hi = paired_interval([a - b for a, b in zip(v, r)])
            diffs.append("-" if k == REFERENCE else fmt_interval(m, lo, hi))
            table.setdefault(k, {})[name] = {"per_seed": v, "minus_reference": [m, lo, hi]}
        lines.append(f"| {label[k]} | " + " | ".join(cells + diffs) + " |")
    mech_keys = list(per_seed[seeds[0]]["mechanism"][HEAD_ARMS[0]])
    lines += ["", "| mechanism (test captions), mean +- sd | " + " | ".join(ARMS[a][0] for a in HEAD_ARMS) + " |"]
    lines += ["|---|" + "---|" * len(HEAD_ARMS)]
    mech = {}
    for mk in mech_keys:
        row = []
        for a in HEAD_ARMS:
            v = [per_seed[s]["mechanism"][a][mk] for s in seeds]
            mech.setdefault(a, {})[mk] = v
            row.append("{:.3f} +- {:.3f}".format(*mean_sd(v)))
        lines.append(f"| {mk} | " + " | ".join(row) + " |")
    return {"seeds": seeds, "table": table, "mechanism": mech, "per_seed": per_seed}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "ablation.yaml")
    ap.add_argument("--parallel", type=int, default=2, help="seeds run at once (each trains with one thread)")
    ap.add_argument("--report-only", action="store_true", help="no training: collect the finished runs")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "ablation")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pipeline overrides for every seed")
    a = ap.parse_args(argv)
    runs = a.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    first = runs / f"seed-{a.seeds[0]}"
    if not a.report_only:
        rc = run_seed(a.seeds[0], runs, a.pipeline, a.set)
        if rc:
            print(f"seed {a.seeds[0]} failed (rc {rc}); see {runs}/seed-{a.seeds[0]}.log", file=sys.stderr)
            return rc
        with ThreadPoolExecutor(a.parallel) as ex:
            rcs = dict(
                zip(a.seeds[1:], ex.map(lambda s: run_seed(s, runs, a.pipeline, a.set, first, SHARED), a.seeds[1:]))
            )
        failed = {s: rc for s, rc in rcs.items() if rc}
        if failed:
            print(f"seeds failed: {failed}; see {runs}/seed-<S>.log", file=sys.stderr)
            return 1
    a.results.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for s in a.seeds:
        run_dir, saved = runs / f"seed-{s}", a.results / f"seed-{s}.json"
        if (run_dir / "bench_distill_only" / "stage.json").exists():
            per_seed[s] = collect(run_dir)
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
