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

from d2s.pipeline import Stage, StageContext
from d2s.shards import atomic_write_text

from .api import COLUMNS, load_embeddings, read_results
from .data import load_shards

# (input name, row label) in table order; the first is the reference for differences.
MODELS = (("baseline", "baseline (sparse only)"), ("pretrain", "dense pre-training only"), ("d2s", "D2S-VSE"))
RUNS = (
    ("stage1_run", "stage 1 (image-dense)"),
    ("baseline_run", "baseline"),
    ("pretrain_run", "pre-training only"),
    ("d2s_run", "D2S stage 2"),
)


@dataclass
class ReportParams:
    title: str = "D2S-VSE report"
    split: str = "test"
    examples: int = 4  # example test images with their captions and top retrievals
    top_k: int = 5
    # where the multi-seed version of this comparison lives (shown under the paired differences)
    seeds_table: str = "docs/experiments.md"


def _fmt_row(label: str, m: dict) -> str:
    return "| " + " | ".join([label] + [f"{m[k]:.1f}" for k, _ in COLUMNS[:7]]) + " |"


def _table(rows: dict[str, dict], note: str) -> list[str]:
    head = ["model"] + [c[1] for c in COLUMNS[:7]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows.items():
        lines.append(_fmt_row(label, m))
    labels = list(rows)
    if len(labels) >= 2:
        ref = rows[labels[0]]
        for label in labels[1:]:
            diff = {k: rows[label][k] - ref[k] for k, _ in COLUMNS[:7]}
            lines.append(
                "| " + " | ".join([f"{label} - {labels[0]}"] + [f"{diff[k]:+.1f}" for k, _ in COLUMNS[:7]]) + " |"
            )
    return lines + ["", note, ""]


def _paired(rsums: dict[str, dict[str, float]], val: dict[str, float], seeds_table: str) -> list[str]:
    """D2S-VSE minus each other arm, this run only (one seed: no interval)."""
    d2s = MODELS[-1][1]
    others = [label for _, label in MODELS[:-1]]
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
        f"One seed, so no interval: the same comparison over several seeds, with 95% intervals, is in `{seeds_table}`.",
        "",
    ]


def _curves(histories: dict[str, list[dict]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not histories:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in histories.items():
        pts = [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    vals = {label: [(r["step"], r["val/rsum"]) for r in rows if "val/rsum" in r] for label, rows in histories.items()}
    if any(len(v) > 1 for v in vals.values()):
        for label, v in vals.items():
            if v:
                axes[1].plot(*zip(*v), marker="o", label=label)
        axes[1].set(title="validation rSum", xlabel="step", ylabel="rSum")
        axes[1].legend(fontsize=8)
    else:  # validated once per run: one bar each
        labels = [label for label, v in vals.items() if v]
        axes[1].bar(
            range(len(labels)), [vals[label][-1][1] for label in labels], color=[f"C{i}" for i in range(len(labels))]
        )
        axes[1].set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        axes[1].set(title="validation rSum (end of run)", ylabel="rSum")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss (total)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
        "pretrain?": "bench results dir of the dense-pre-training-only ablation",
        "shards?": "shards dir (example images and captions)",
        "captions?": "densecap report dir (caption length histogram, drop counts)",
        **{f"{name}?": f"vse run dir of {label} (metrics.jsonl)" for name, label in RUNS},
    }
    outputs = {"report": "directory with report.md and PNGs"}
    version = "3"

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
            rows = {
                label: r.benchmarks[bench_name].metrics.to_dict()
                for label, r in results.items()
                if bench_name in r.benchmarks
            }
            if not rows:
                continue
            any_r = next(r for r in results.values() if bench_name in r.benchmarks).benchmarks[bench_name]
            lines += [f"## {heading}", ""]
            lines += _table(
                rows,
                f"{p.split} split: {any_r.n_images} images, {any_r.n_texts} texts. Recall in %; "
                "rSum is the sum of the six recalls (max 600).",
            )
            summary[bench_name] = {label: round(m["rsum"], 2) for label, m in rows.items()}
        lines += _paired(summary, self._val_rsums(ctx), p.seeds_table)

        histories = {}
        for name, label in RUNS:
            path = Path(ctx.inputs[name]) / "metrics.jsonl" if ctx.inputs.get(name) else None
            if path is not None and path.exists():
                histories[label] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if _curves(histories, out / "training_curves.png"):
            lines += ["## Training", "", "![training curves](training_curves.png)", ""]
            for name, label in RUNS:
                sp = Path(ctx.inputs[name]) / "summary.json" if ctx.inputs.get(name) else None
                if sp is not None and sp.exists():
                    s = json.loads(sp.read_text())
                    lines.append(
                        f"- {label}: {s['steps']} steps, {s['seconds']:.0f} s, {s['samples_per_s']:.0f} samples/s, "
                        f"best val rSum {s['best_rsum'] if s['best_rsum'] is not None else 'n/a'}"
                    )
            lines.append("")

        if ctx.inputs.get("captions"):
            cap = Path(ctx.inputs["captions"])
            lines += ["## Dense captions", ""]
            for png in sorted(cap.glob("*.png")):
                shutil.copy(png, out / f"captions_{png.name}")
                lines += [f"![{png.stem}](captions_{png.name})", ""]
            sj = cap / "summary.json"
            if sj.exists():
                s = json.loads(sj.read_text())
                keep = {k: v for k, v in s.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
                lines += ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in keep.items()] + [""]

        if ctx.inputs.get("shards") and p.examples > 0 and results:
            lines += self._examples(ctx, p, out)

        atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
        ctx.log.info("report: %s", final / "report.md")
        return summary

    @staticmethod
    def _val_rsums(ctx: StageContext) -> dict[str, float]:
        out = {}
        for (_name, label), (run, _) in zip(MODELS, RUNS[1:]):
            sp = Path(ctx.inputs[run]) / "summary.json" if ctx.inputs.get(run) else None
            if sp is not None and sp.exists() and json.loads(sp.read_text()).get("best_rsum") is not None:
                out[label] = json.loads(sp.read_text())["best_rsum"]
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
