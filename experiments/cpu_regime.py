"""The CPU-regime experiment of docs/experiments.md: seeds x 3 arms, paired differences, mechanism.

Runs ``pipelines/cpu_regime.yaml`` once per seed (``runs/cpu_regime/seed-<S>``; the world,
captions and pre-trained assets of the first seed are reused by the others, so every arm of
every seed starts from the same backbones), then reports, on val (the checkpoint-selection
split) and test, for sparse-caption retrieval and long-text (image <-> dense text) retrieval:

- rSum mean +- sd per arm (baseline, pre-training + align, D2S);
- the paired per-seed differences D2S - pre-training + align and D2S - baseline, their mean and
  a 95% t-interval;
- mechanism figures per seed: cosine between the stage-1 and stage-2 image embeddings of the
  test images; the frozen teacher's dense->image rSum with the stage-1 image encoder (before)
  and the stage-2 one (after); mean pairwise cosine of the student head's outputs over test
  captions.

    .venv/bin/python experiments/cpu_regime.py --seeds 0 1 2 3 4 [--parallel 2] [--report-only]

Each finished seed's figures go to ``experiments/results/cpu_regime/seed-<S>.json`` (small,
committed, so the table can be rebuilt and extended with more seeds later without the run
dirs); the table is written to ``summary.md`` / ``summary.json`` there and printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.stats import paired_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("world", "captions", "assets")
ARMS = {"baseline": "baseline", "pretrain": "pre-training + align", "d2s": "D2S-VSE"}


def run_seed(seed: int, runs: Path, first: Path, pipeline: Path, log: Path) -> int:
    run_dir = runs / f"seed-{seed}"
    if run_dir != first:
        # the first seed's data stages (same params, so the runner finds them cached): every
        # arm of every seed starts from the same world, captions and pre-trained backbones
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage in SHARED:
            link = run_dir / stage
            if not link.exists():
                link.symlink_to(Path("..") / first.name / stage)
    cmd = [str(ROOT / ".venv" / "bin" / "d2s"), "run", str(pipeline), f"vars.seed={seed}", "--run-dir", str(run_dir)]
    with open(log, "w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def finished(run_dir: Path) -> bool:
    marker = run_dir / "bench_d2s" / "stage.json"
    return marker.exists() and "finished" in json.loads(marker.read_text())


def stage_record(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


def bench_rsums(results_dir: Path) -> dict[str, float]:
    doc = json.loads((Path(results_dir) / "results.json").read_text())
    return {name: b["metrics"]["rsum"] for name, b in doc["benchmarks"].items()}


@torch.no_grad()
def mechanism(run_dir: Path) -> dict[str, float]:
    from d2s.retrieval import retrieval_metrics
    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    shards = Path(stage_record(run_dir, "captions")["outputs"]["shards"])
    test = [s for s in read_samples(shards, "test") if s.kept_dense()]
    images = [s.image for s in test]
    dense = [s.kept_dense()[0].text for s in test]
    owner = torch.arange(len(test))
    b1 = load_bundle(stage_record(run_dir, "stage1")["outputs"]["bundle"])
    b2 = load_bundle(stage_record(run_dir, "d2s")["outputs"]["bundle"])
    img1, img2 = b1.embed_images(images), b2.embed_images(images)
    teacher_dense = b1.embed_texts(dense)  # the stage-1 text encoder is the frozen teacher
    before = retrieval_metrics(img1, teacher_dense, owner).rsum
    after = retrieval_metrics(img2, teacher_dense, owner).rsum
    # the student head's raw outputs on the test captions
    m = b2.model
    caps = [c for s in test for c in s.sparse]
    outs = []
    for i in range(0, len(caps), 256):
        ids, mask = b2.tokenizer(caps[i : i + 256], m.cfg.text.max_length)
        words = m.text.word_features(ids, mask.bool())
        outs.append(m.student(words, mask.bool()).float())
    h = torch.nn.functional.normalize(torch.cat(outs), dim=-1)
    n = h.shape[0]
    pair_cos = float((h.sum(0).pow(2).sum() - n) / (n * (n - 1)))  # mean over pairs i != j
    return {
        "image_cos_stage1_stage2": float((img1 * img2).sum(-1).mean()),
        "teacher_dense_to_image_rsum_before": float(before),
        "teacher_dense_to_image_rsum_after": float(after),
        "head_output_pairwise_cos": pair_cos,
    }


def collect(run_dir: Path) -> dict:
    out: dict = {"val": {}, "test": {}}
    for arm in ARMS:
        summary = json.loads((Path(stage_record(run_dir, arm)["outputs"]["run"]) / "summary.json").read_text())
        out["val"][arm] = {"custom": summary["best_rsum"]}
        out["test"][arm] = bench_rsums(stage_record(run_dir, f"bench_{arm}")["outputs"]["results"])
    out["mechanism"] = mechanism(run_dir)
    return out


def report(per_seed: dict[int, dict]) -> tuple[dict, str]:
    seeds = sorted(per_seed)
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); rSum out of 600; intervals: 95% Student t "
        "over the paired per-seed differences.",
        "",
    ]
    table: dict = {}
    rows = [
        ("val", "custom", "val, sparse captions (best checkpoint's rSum)"),
        ("test", "custom", "test, sparse captions"),
        ("test", "long_text", "test, long text (image <-> dense text)"),
    ]
    lines += [
        "| split, task | baseline | pre-training + align | D2S-VSE | D2S - pre-training + align | D2S - baseline |",
        "|---|---|---|---|---|---|",
    ]
    for split, bench, label in rows:
        if not all(bench in per_seed[s][split][a] for s in seeds for a in ARMS):
            continue
        vals = {a: [per_seed[s][split][a][bench] for s in seeds] for a in ARMS}
        cells = [f"{np.mean(v):.1f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.1f}" for v in vals.values()]
        diffs = {}
        for other in ("pretrain", "baseline"):
            m, lo, hi = paired_interval([d - o for d, o in zip(vals["d2s"], vals[other])])
            diffs[other] = {"mean": m, "ci95": [lo, hi], "per_seed": [d - o for d, o in zip(vals["d2s"], vals[other])]}
            cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        table[f"{split}/{bench}"] = {"per_arm": vals, "d2s_minus": diffs}
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed (D2S - pre-training + align, D2S - baseline), test sparse: "
        + ", ".join(
            f"seed {s}: {per_seed[s]['test']['d2s']['custom'] - per_seed[s]['test']['pretrain']['custom']:+.1f} / "
            f"{per_seed[s]['test']['d2s']['custom'] - per_seed[s]['test']['baseline']['custom']:+.1f}"
            for s in seeds
        ),
        "",
    ]
    mech = {k: [per_seed[s]["mechanism"][k] for s in seeds] for k in per_seed[seeds[0]]["mechanism"]}
    lines += ["| mechanism (test images / captions) | mean +- sd | per seed |", "|---|---|---|"]
    for k, v in mech.items():
        lines.append(
            f"| {k} | {np.mean(v):.3f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} | "
            + ", ".join(f"{x:.3f}" for x in v)
            + " |"
        )
    return {"seeds": seeds, "table": table, "mechanism": mech, "per_seed": per_seed}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "cpu_regime")
    ap.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "cpu_regime.yaml")
    ap.add_argument("--parallel", type=int, default=2, help="seeds run at once (each uses ~2 processes)")
    ap.add_argument("--report-only", action="store_true", help="no training: collect the finished runs")
    ap.add_argument(
        "--results",
        type=Path,
        default=ROOT / "experiments" / "results" / "cpu_regime",
        help="per-seed figures (JSON) and the summary; seeds with no run dir are read from here",
    )
    a = ap.parse_args(argv)
    runs = a.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    first = runs / f"seed-{a.seeds[0]}"
    if not a.report_only:
        rc = run_seed(a.seeds[0], runs, first, a.pipeline, runs / f"seed-{a.seeds[0]}.log")
        if rc:
            print(f"seed {a.seeds[0]} failed (rc {rc}); see {runs}/seed-{a.seeds[0]}.log", file=sys.stderr)
            return rc
        with ThreadPoolExecutor(a.parallel) as ex:
            rcs = dict(
                zip(
                    a.seeds[1:],
                    ex.map(lambda s: run_seed(s, runs, first, a.pipeline, runs / f"seed-{s}.log"), a.seeds[1:]),
                )
            )
        failed = [s for s, rc in rcs.items() if rc]
        if failed:
            print(f"seeds {failed} failed; see their logs in {runs}", file=sys.stderr)
            return 1
    torch.set_num_threads(2)
    a.results.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in a.seeds:
        saved = a.results / f"seed-{seed}.json"
        run_dir = runs / f"seed-{seed}"
        if finished(run_dir):
            per_seed[seed] = collect(run_dir)
            saved.write_text(json.dumps(per_seed[seed], indent=2) + "\n")
        elif saved.exists():
            per_seed[seed] = json.loads(saved.read_text())
        else:
            print(f"seed {seed}: no finished run in {run_dir} and no {saved}; left out", file=sys.stderr)
    if not per_seed:
        return 1
    doc, md = report(per_seed)
    (a.results / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    (a.results / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
