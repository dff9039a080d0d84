"""The ``report`` stage: baseline vs D2S-VSE in one markdown page with plots.

Reads what earlier stages wrote: bench results (``results.json`` + ``embeddings.safetensors``),
training histories (``metrics.jsonl`` of vse runs), the densecap summary, and the shards
(for example images). Writes ``report.md`` and PNGs into its output directory.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from d2s.atomic import atomic_write_text
from d2s.pipeline import Stage, StageContext

from .api import COLUMNS, BenchmarkResult, load_embeddings, read_results
from .data import load_shards
from .intervals import BootstrapSettings, paired_difference

# (input name, row label) in table order, the paper's ablation names; the first is the
# reference of the tables' differences, D2S-VSE that of the paired differences.
MODELS = (
    ("baseline", "align only (baseline)"),
    ("pretrain_only", "pre-training only"),
    ("pretrain_align", "pre-training + align"),
    ("d2s", "D2S-VSE"),
    ("d2s_raw", "D2S-VSE, raw head"),
)
D2S = "D2S-VSE"
RUNS = (
    ("stage1_run", "stage 1 (image-dense)"),
    ("baseline_run", "baseline"),
    ("pretrain_align_run", "pre-training + align"),
    ("d2s_run", "D2S stage 2"),
)
# where each model's best val rSum (sparse captions, the checkpoint choice) is: run input and
# the summary.json keys; pre-training only was chosen on dense text, so it has none
VAL_RSUM = {
    "baseline": ("baseline_run", ("best_rsum",)),
    "pretrain_align": ("pretrain_align_run", ("best_rsum",)),
    "d2s": ("d2s_run", ("best_rsum",)),
    "d2s_raw": ("d2s_run", ("compositions", "raw", "best_rsum")),
}


@dataclass
class ReportParams:
    title: str = "D2S-VSE report"
    split: str = "test"
    examples: int = 4  # example test images with their captions and top retrievals
    top_k: int = 5
    # where the multi-seed version of this comparison lives (shown under the paired differences)
    seeds_table: str = "docs/experiments.md"


def _fmt_row(label: str, m: dict, extra: str) -> str:
    return "| " + " | ".join([label] + [f"{m[k]:.1f}" for k, _ in COLUMNS[:7]] + [extra]) + " |"


def _paired_rsum(a: BenchmarkResult, b: BenchmarkResult) -> str:
    """``a - b`` in rSum with its paired bootstrap interval (a's bootstrap settings), where both kept ranks."""
    if a.query_ranks is None or b.query_ranks is None or not a.query_ranks.same_queries(b.query_ranks):
        return "n/a"
    s = a.bootstrap or {}
    d = paired_difference(
        a.query_ranks,
        b.query_ranks,
        BootstrapSettings(int(s.get("replicates", 1000)), int(s.get("seed", 0)), float(s.get("level", 0.95))),
    )["rsum"]
    return f"[{d['low']:+.1f}, {d['high']:+.1f}]"


def _table(rows: dict[str, BenchmarkResult], note: str) -> list[str]:
    """One row per model (rSum with its bootstrap interval), then each model minus the first with
    the paired bootstrap interval of the rSum difference."""
    head = ["model"] + [c[1] for c in COLUMNS[:7]] + ["rSum interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        iv = r.intervals.get("rsum")
        lines.append(_fmt_row(label, r.metrics.to_dict(), f"[{iv[0]:.1f}, {iv[1]:.1f}]" if iv else "n/a"))
    labels = list(rows)
    if len(labels) >= 2:
        ref = rows[labels[0]].metrics.to_dict()
        for label in labels[1:]:
            m = rows[label].metrics.to_dict()
            cells = [f"{m[k] - ref[k]:+.1f}" for k, _ in COLUMNS[:7]] + [_paired_rsum(rows[label], rows[labels[0]])]
            lines.append("| " + " | ".join([f"{label} - {labels[0]}"] + cells) + " |")
    level = next((r.bootstrap.get("level") for r in rows.values() if r.bootstrap), 0.95)
    return lines + [
        "",
        note + f" Intervals: {100 * level:g}% percentile bootstrap over the test images (a difference row: "
        "paired, the same images resampled for both models); they cover the choice of test images, not "
        "training seeds.",
        "",
    ]


def _paired(rsums: dict[str, dict[str, float]], val: dict[str, float], seeds_table: str) -> list[str]:
    """D2S-VSE minus each other arm, this run only (one seed: no seed interval; the tables above
    carry the test-image bootstrap intervals)."""
    d2s = D2S
    others = [label for _, label in MODELS if label != D2S]
    rows = [("val, sparse (best checkpoint)", val)] + [
        (f"test, {name.replace('_', ' ')}", r) for name, r in rsums.items()
    ]
    rows = [(k, r) for k, r in rows if d2s in r and any(o in r for o in others)]
    if not rows:
        return []
    lines = [
        "## Paired difference of this run",
        "",
        "| rSum | " + " | ".join(f"D2S-VSE - {o}" for o in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for k, r in rows:
        lines.append(f"| {k} | " + " | ".join(f"{r[d2s] - r[o]:+.1f}" if o in r else "n/a" for o in others) + " |")
    return lines + [
        "",
        "One training seed, so no interval over seeds here (the tables above give each difference's "
        f"bootstrap interval over test images): the comparison over several seeds is in `{seeds_table}`.",
        "",
    ]


def _loss_terms(rows: list[dict]) -> list[str]:
    """The run's own objective terms (``loss/<term>``), plus the total when there are several."""
    terms = sorted({k for r in rows for k in r if k.startswith("loss/") and k != "loss/total"})
    return terms + ["loss/total"] if len(terms) != 1 else terms


def _curves(histories: dict[str, list[dict]], out: Path) -> Path | None:
    """One loss panel per run (each run has its own objective and scale) and one panel of
    validation rSum for all runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: rows for label, rows in histories.items() if any(k.startswith("loss/") for r in rows for k in r)}
    if not histories:
        return None
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.2 * (len(runs) + 1), 3.8), squeeze=False)
    for ax, (label, rows) in zip(axes[0], runs.items()):
        terms = _loss_terms(rows)
        for term in terms:
            pts = [(r["step"], r[term]) for r in rows if term in r]
            ax.plot(*zip(*pts), label=term.removeprefix("loss/"), lw=2 if term == "loss/total" else 1)
        ys = [r[t] for r in rows for t in terms if t in r]
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")  # terms orders of magnitude apart (summed alignment vs batch-mean distillation)
        ax.set(title=f"{label}: training loss", xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    _val_panel(axes[0][-1], histories)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _val_panel(ax, histories: dict[str, list[dict]]) -> None:
    vals = {label: [(r["step"], r["val/rsum"]) for r in rows if "val/rsum" in r] for label, rows in histories.items()}
    if any(len(v) > 1 for v in vals.values()):
        for label, v in vals.items():
            if v:
                ax.plot(*zip(*v), marker="o", label=label)
        ax.set(title="validation rSum", xlabel="step", ylabel="rSum")
        ax.legend(fontsize=8)
    else:  # validated once per run: one bar each
        labels = [label for label, v in vals.items() if v]
        ax.bar(
            range(len(labels)), [vals[label][-1][1] for label in labels], color=[f"C{i}" for i in range(len(labels))]
        )
        ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax.set(title="validation rSum (end of run)", ylabel="rSum")


def _fmt_num(x, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


PACKAGES = ("d2s-core", "d2s-densecap", "d2s-vse", "d2s-bench", "torch", "transformers", "accelerate", "webdataset")


def run_metadata(run_dir: Path, run_configs: dict[str, dict], out: Path) -> list[str]:
    """What produced this report: the pipeline config (copied next to it), each training
    run's seed and recipe, package versions, Python, platform and the source commit."""
    import platform
    import subprocess
    import sys
    from importlib import metadata

    lines = ["## Run", ""]
    resolved = run_dir / "resolved.yaml"
    if resolved.exists():
        shutil.copy(resolved, out / "pipeline.resolved.yaml")
        lines.append(f"- pipeline config: [pipeline.resolved.yaml](pipeline.resolved.yaml) (run dir `{run_dir}`)")
    for label, cfg in run_configs.items():
        train = cfg.get("train", cfg)
        lines.append(
            f"- {label}: recipe `{train.get('recipe', '?')}`, seed {train.get('seed', '?')}, "
            f"model `{cfg.get('model', {}).get('name', train.get('model', '?'))}`"
        )
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    lines.append(f"- versions: Python {platform.python_version()}, " + ", ".join(versions))
    lines.append(f"- platform: {platform.platform()}, {sys.byteorder}-endian")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        lines.append(f"- source: git {commit}{' (with uncommitted changes)' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        lines.append("- source: not a git checkout")
    return lines + [""]


def _example_strip(
    images: list[bytes], query: str, ranked: dict[str, list[int]], truth: int, out: Path, k: int
) -> Path:
    """One PNG: the query image, then each model's top-k images for the query (green = correct)."""
    from PIL import Image, ImageDraw

    size, pad, label_w = 96, 6, 190
    rows = len(ranked)
    canvas = Image.new("RGB", (label_w + (k + 1) * (size + pad), rows * (size + pad) + 26), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"query: {query}"[:120], fill="black")
    draw.text((label_w, 12), "true image", fill="black")

    def tile(idx: int) -> Image.Image:
        return Image.open(io.BytesIO(images[idx])).convert("RGB").resize((size, size), Image.NEAREST)

    for r, (label, idxs) in enumerate(ranked.items()):
        y = 26 + r * (size + pad)
        draw.text((4, y + size // 2), label[:30], fill="black")
        canvas.paste(tile(truth), (label_w, y))
        for j, idx in enumerate(idxs[:k]):
            x = label_w + (j + 1) * (size + pad)
            canvas.paste(tile(idx), (x, y))
            draw.rectangle(
                [x - 2, y - 2, x + size + 1, y + size + 1], outline="green" if idx == truth else "red", width=2
            )
    canvas.save(out)
    return out


class ReportStage(Stage):
    """Markdown report: retrieval tables with differences, curves, caption stats, examples."""

    Params = ReportParams
    inputs = {
        "baseline": "bench results dir of the sparse-only baseline",
        "d2s": "bench results dir of D2S-VSE",
        "pretrain_only?": "bench results dir of the stage-1 model on sparse captions (pre-training only)",
        "pretrain_align?": "bench results dir of the pre-training + align ablation",
        "d2s_raw?": "bench results dir of D2S-VSE with the student head added raw at evaluation (bundle-raw)",
        "shards?": "shards dir (example images and captions)",
        "captions?": "densecap report dir (caption length histogram, drop counts)",
        **{f"{name}?": f"vse run dir of {label} (metrics.jsonl)" for name, label in RUNS},
    }
    outputs = {"report": "directory with report.md and PNGs"}
    # 4: per-run loss panels, run metadata, rSum to one decimal; 5: the paper's ablation names,
    # pre-training only, D2S-VSE under both head compositions; 6: bootstrap intervals (rSum, paired
    # differences)
    version = "6"

    def run(self, ctx: StageContext) -> dict:
        p: ReportParams = ctx.params
        final = Path(ctx.outputs["report"])
        out = final.with_name(final.name + ".tmp")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        results = {label: read_results(ctx.inputs[name]) for name, label in MODELS if ctx.inputs.get(name)}
        lines = [f"# {p.title}", ""]
        summary: dict = {}
        for bench_name, heading in (
            ("custom", "Sparse-caption retrieval"),
            ("long_text", "Long-text retrieval (image <-> dense text)"),
        ):
            rows = {label: r.benchmarks[bench_name] for label, r in results.items() if bench_name in r.benchmarks}
            if not rows:
                continue
            any_r = next(r for r in results.values() if bench_name in r.benchmarks).benchmarks[bench_name]
            lines += [f"## {heading}", ""]
            lines += _table(
                rows,
                f"{p.split} split: {any_r.n_images} images, {any_r.n_texts} texts. Recall in %; "
                "rSum is the sum of the six recalls (max 600).",
            )
            summary[bench_name] = {label: round(r.metrics.rsum, 2) for label, r in rows.items()}
        lines += _paired(summary, self._val_rsums(ctx), p.seeds_table)

        lines += self._training(ctx, out) + self._captions(ctx, out)

        if ctx.inputs.get("shards") and p.examples > 0 and results:
            lines += self._examples(ctx, p, out)
        lines += run_metadata(ctx.run_dir, self._run_configs(ctx), out)

        atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
        ctx.log.info("report: %s", final / "report.md")
        return summary

    @staticmethod
    def _training(ctx: StageContext, out: Path) -> list[str]:
        histories = {}
        for name, label in RUNS:
            path = Path(ctx.inputs[name]) / "metrics.jsonl" if ctx.inputs.get(name) else None
            if path is not None and path.exists():
                histories[label] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if not _curves(histories, out / "training_curves.png"):
            return []
        lines = ["## Training", "", "![training curves](training_curves.png)", ""]
        for name, label in RUNS:
            sp = Path(ctx.inputs[name]) / "summary.json" if ctx.inputs.get(name) else None
            if sp is not None and sp.exists():
                s = json.loads(sp.read_text())
                lines.append(
                    f"- {label}: {s['steps']} steps, {s['seconds']:.0f} s, {s['samples_per_s']:.0f} samples/s, "
                    f"best val rSum {_fmt_num(s['best_rsum'])}"
                )
        return lines + [""]

    @staticmethod
    def _captions(ctx: StageContext, out: Path) -> list[str]:
        if not ctx.inputs.get("captions"):
            return []
        cap = Path(ctx.inputs["captions"])
        lines = ["## Dense captions", ""]
        for png in sorted(cap.glob("*.png")):
            shutil.copy(png, out / f"captions_{png.name}")
            lines += [f"![{png.stem}](captions_{png.name})", ""]
        sj = cap / "summary.json"
        if sj.exists():
            s = json.loads(sj.read_text())
            keep = {k: v for k, v in s.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            lines += ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in keep.items()] + [""]
        return lines

    @staticmethod
    def _run_configs(ctx: StageContext) -> dict[str, dict]:
        out = {}
        for name, label in RUNS:
            cp = Path(ctx.inputs[name]) / "run_config.json" if ctx.inputs.get(name) else None
            if cp is not None and cp.exists():
                out[label] = json.loads(cp.read_text())
        return out

    @staticmethod
    def _val_rsums(ctx: StageContext) -> dict[str, float]:
        out = {}
        for name, label in MODELS:
            run, keys = VAL_RSUM.get(name, (None, ()))
            sp = (
                Path(ctx.inputs[run]) / "summary.json" if run and ctx.inputs.get(run) and ctx.inputs.get(name) else None
            )
            if sp is None or not sp.exists():
                continue
            value = json.loads(sp.read_text())
            for k in keys:
                value = value.get(k) if isinstance(value, dict) else None
            if value is not None:
                out[label] = value
        return out

    def _examples(self, ctx: StageContext, p: ReportParams, out: Path) -> list[str]:
        data = load_shards(ctx.inputs["shards"], p.split, 5)
        embs = {}
        for name, label in MODELS:
            f = Path(ctx.inputs[name]) / "embeddings.safetensors" if ctx.inputs.get(name) else None
            if f is not None and f.exists():
                embs[label] = load_embeddings(f)
        if not embs:
            return []
        lines = [
            "## Examples",
            "",
            "Each strip: the true image, then each model's top retrievals for the query "
            "(green: the true image, red: others).",
            "",
        ]
        n = len(data.image_ids)
        picks = sorted({int(i) for i in torch.linspace(0, n - 1, p.examples).round().tolist()})
        for i in picks:
            cap_idx = int((torch.as_tensor(data.txt_to_img) == i).nonzero()[0])
            ranked = {
                label: (e.txt[cap_idx] @ e.img.T).argsort(descending=True)[: p.top_k].tolist()
                for label, e in embs.items()
            }
            png = _example_strip(data.images, data.captions[cap_idx], ranked, i, out / f"example_{i}.png", p.top_k)
            caps = [c for c, t in zip(data.captions, data.txt_to_img) if t == i]
            dense = data.dense[list(data.dense_img).index(i)] if i in set(int(x) for x in data.dense_img) else ""
            lines += [f"### {data.image_ids[i]}", "", f"![example]({png.name})", ""]
            lines += [f"- sparse: {c}" for c in caps]
            if dense:
                lines += [f"- dense: {dense}"]
            lines.append("")
        return lines
