"""The per-run summary report: counts per reason, a length histogram, examples kept and dropped.

<report>/summary.json   totals over all shards (images, captions, reasons, tokens)
<report>/reasons.csv    captions per (source, verdict)
<report>/shards.csv     one row of stats per shard
<report>/lengths.png    word-length histogram of kept vs dropped captions
<report>/rejects.jsonl  every rejected image and dropped / failed caption, with its reason
<report>/report.md      all of the above in one readable page, with examples
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from d2s.atomic import atomic_write_json, atomic_write_text
from d2s.shards import completed_shards, iter_records

log = logging.getLogger(__name__)


def _dense_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    paths = sorted(completed_shards(out))
    for rec in iter_records(paths):
        doc = json.loads(rec["json"])
        for d in doc.get("dense", []):
            rows.append(
                {
                    "key": rec["__key__"],
                    "id": doc.get("id", ""),
                    "split": doc.get("split", ""),
                    "source": d["source"],
                    "model": d.get("model", ""),
                    "verdict": d.get("verdict", "keep"),
                    "error": d.get("error", ""),
                    "words": len(d["text"].split()),
                    "text": d["text"],
                }
            )
    return rows


def write_report(out: str | Path, report_dir: str | Path, n_examples: int = 3) -> dict[str, Any]:
    import pandas as pd

    out, report_dir = Path(out), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    shard_stats = pd.DataFrame(list(completed_shards(out).values()))
    dense = pd.DataFrame(_dense_rows(out), columns=DENSE_COLUMNS)
    rejects = []
    for p in sorted((out / "rejects").glob("*.jsonl")):
        rejects += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    atomic_write_text(report_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))

    reasons = (
        dense.groupby(["source", "verdict"]).size().rename("count").reset_index()
        if len(dense)
        else pd.DataFrame(columns=["source", "verdict", "count"])
    )
    reasons.to_csv(report_dir / "reasons.csv", index=False)
    if len(shard_stats):
        shard_stats.drop(
            columns=[c for c in ("world", "captioners", "filters") if c in shard_stats], errors="ignore"
        ).to_csv(report_dir / "shards.csv", index=False)
    ok = dense[(dense.verdict == "keep") & (dense.error == "")]["words"] if len(dense) else []
    bad = dense[dense.verdict != "keep"]["words"] if len(dense) else []
    _lengths_plot(report_dir / "lengths.png", list(ok), list(bad))
    summary = _summary(shard_stats, dense, rejects, list(ok))
    atomic_write_json(report_dir / "summary.json", summary)
    atomic_write_text(report_dir / "report.md", _markdown(out, summary, reasons, dense, n_examples))
    log.info("report written to %s", report_dir)
    return summary


DENSE_COLUMNS = ["key", "id", "split", "source", "model", "verdict", "error", "words", "text"]


def _lengths_plot(path: Path, ok: list[int], bad: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([ok, bad], bins=30, label=["kept", "dropped / failed"], stacked=True)
    ax.set_xlabel("words per dense caption")
    ax.set_ylabel("captions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(shard_stats, dense, rejects: list[dict], ok: list[int]) -> dict[str, Any]:
    import pandas as pd

    def num(col: str) -> int:
        return int(shard_stats[col].fillna(0).sum()) if col in shard_stats else 0

    image_reasons = pd.Series(
        [r["reason"].split(":")[0] for r in rejects if r.get("kind") == "image"], dtype=str
    ).value_counts()
    return {
        "shards": int(len(shard_stats)),
        "images": num("count"),
        "images_rejected": num("images_rejected"),
        "image_reject_reasons": {k: int(v) for k, v in image_reasons.items()},
        "captions": int(len(dense)),
        "captions_by_verdict": {k: int(v) for k, v in dense.verdict.value_counts().items()} if len(dense) else {},
        "captions_by_source": {k: int(v) for k, v in dense.source.value_counts().items()} if len(dense) else {},
        "caption_errors": int((dense.error != "").sum()) if len(dense) else 0,
        "prompt_tokens": num("prompt_tokens"),
        "completion_tokens": num("completion_tokens"),
        "mean_words_kept": round(float(pd.Series(ok).mean()), 2) if len(ok) else 0.0,
    }


def _markdown(out: Path, summary: dict, reasons, dense, n_examples: int) -> str:
    lines = [
        f"# densecap report: {out}",
        "",
        "```json",
        json.dumps(summary, indent=2),
        "```",
        "",
        "## Captions per source and verdict",
        "",
        reasons.to_markdown(index=False) if _has_tabulate() else reasons.to_string(index=False),
        "",
        "![lengths](lengths.png)",
        "",
    ]
    for title, sel in (
        ("kept", dense[dense.verdict == "keep"] if len(dense) else dense),
        ("dropped", dense[dense.verdict != "keep"] if len(dense) else dense),
    ):
        lines += [f"## Examples {title}", ""]
        for _, r in sel.groupby("verdict").head(n_examples).iterrows() if len(sel) else []:
            text = (r.text or r.error).replace("\n", " ")
            lines.append(f"- `{r.key}` [{r.source} / {r.verdict}] {text[:300]}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _has_tabulate() -> bool:
    """tabulate (a dependency of d2s-densecap) renders pandas' to_markdown; plain text without it."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        log.warning("tabulate is not installed: the report's table is plain text (pip install tabulate)")
        return False
    return True
