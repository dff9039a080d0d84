"""The per-run summary report: counts per reason, a length histogram, examples kept and dropped.

<report>/summary.json   totals over all shards (images, captions, reasons, tokens)
<report>/reasons.csv    captions per (source, verdict)
<report>/shards.csv     one row of stats per shard
<report>/lengths.png    word-length histogram of kept vs dropped captions
<report>/grounding.png  histogram of sentence grounding scores, kept vs removed (when scored)
<report>/rejects.jsonl  every rejected image and dropped / failed caption, with its reason
<report>/report.md      all of the above in one readable page, with examples
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from d2s.atomic import atomic_write_json, atomic_write_text
from d2s.integrity import TEXT_VERDICT, Integrity, read_integrity
from d2s.shards import completed_shards, iter_records

log = logging.getLogger(__name__)


def _dense_rows(out: Path, integrity: Integrity) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per dense text, and one per scored sentence (grounding); the texts of duplicate
    images (the dedup index) are left out, duplicate texts get the verdict ``corpus_duplicate``."""
    rows, sentences = [], []
    paths = sorted(completed_shards(out))
    for rec in iter_records(paths):
        shard = Path(rec["__url__"]).name
        if integrity.is_duplicate(shard, rec["__key__"]):
            continue
        doc = json.loads(rec["json"])
        for d in doc.get("dense", []):
            if d.get("verdict", "keep") == "keep" and (shard, rec["__key__"], d["source"]) in integrity.duplicate_texts:
                d["verdict"] = TEXT_VERDICT
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
                    "grounding_score": d.get("scores", {}).get("grounding_score"),
                }
            )
            for x in d.get("sentences") or []:
                sentences.append({"key": rec["__key__"], "source": d["source"], **x})
    return rows, sentences


def write_report(out: str | Path, report_dir: str | Path, n_examples: int = 3) -> dict[str, Any]:
    import pandas as pd

    out, report_dir = Path(out), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    shard_stats = pd.DataFrame(list(completed_shards(out).values()))
    integrity = read_integrity(out)
    rows, sentence_rows = _dense_rows(out, integrity)
    dense = pd.DataFrame(rows, columns=DENSE_COLUMNS)
    sentences = pd.DataFrame(sentence_rows, columns=SENTENCE_COLUMNS)
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
            columns=[c for c in ("world", "caption_sources", "filters") if c in shard_stats], errors="ignore"
        ).to_csv(report_dir / "shards.csv", index=False)
    ok = dense[(dense.verdict == "keep") & (dense.error == "")]["words"] if len(dense) else []
    bad = dense[dense.verdict != "keep"]["words"] if len(dense) else []
    _lengths_plot(report_dir / "lengths.png", list(ok), list(bad))
    summary = _summary(shard_stats, dense, rejects, list(ok))
    if integrity:  # what the dedup / contamination index says (the captions above leave duplicates out)
        summary["integrity"] = {
            "duplicate_images_skipped": len(integrity.duplicate_images),
            "duplicate_texts_dropped": len(integrity.duplicate_texts),
            "contaminated_images": len(integrity.contaminated),
        }
    if len(sentences):
        summary["grounding"] = _grounding_summary(shard_stats, sentences)
        _grounding_plot(report_dir / "grounding.png", sentences)
    atomic_write_json(report_dir / "summary.json", summary)
    md = _markdown(out, summary, reasons, dense, n_examples) + _grounding_markdown(sentences, rejects, n_examples)
    atomic_write_text(report_dir / "report.md", md)
    log.info("report written to %s", report_dir)
    return summary


DENSE_COLUMNS = ["key", "id", "split", "source", "model", "verdict", "error", "words", "text", "grounding_score"]
SENTENCE_COLUMNS = ["key", "source", "text", "score", "similarity", "removed"]
GROUNDING_COUNTS = ("captions_scored", "captions_scores_reused", "sentences_scored", "captions_repaired")
GROUNDING_COUNTS += ("sentences_removed", "dropped_unsupported", "restored_unsupported")


def _grounding_summary(shard_stats, sentences) -> dict[str, Any]:
    """Sentence-score quantiles and what grounding did (from the shards' stats)."""
    q = sentences.score.quantile([0.05, 0.25, 0.5, 0.75, 0.95])
    counts = {c: int(shard_stats[c].fillna(0).sum()) for c in GROUNDING_COUNTS if c in shard_stats}
    return {
        "sentences": int(len(sentences)),
        "sentences_removed_now": int(sentences.removed.sum()),
        "score_quantiles": {f"p{int(k * 100)}": round(float(v), 3) for k, v in q.items()},
        **counts,
    }


def _grounding_plot(path: Path, sentences) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    parts = [sentences[~sentences.removed].score.tolist(), sentences[sentences.removed].score.tolist()]
    ax.hist(parts, bins=40, label=["kept", "removed by repair"], stacked=True)
    ax.set_xlabel("sentence grounding score (calibrated)")
    ax.set_ylabel("sentences")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grounding_markdown(sentences, rejects: list[dict], n_examples: int) -> str:
    if not len(sentences):
        return ""
    lines = ["## Grounding", "", "![grounding](grounding.png)", ""]
    for title, sel in (
        ("lowest", sentences.nsmallest(n_examples, "score")),
        ("highest", sentences.nlargest(n_examples, "score")),
    ):
        lines += [f"Sentences scoring {title}:", ""]
        lines += [f"- `{r.key}` [{r.source}] {r.score:+.2f} {r.text[:200]}" for r in sel.itertuples()]
        lines.append("")
    repairs = [r for r in rejects if r.get("kind") == "repair"][:n_examples]
    if repairs:
        lines += ["Repairs (sentences removed):", ""]
        for r in repairs:
            removed = "; ".join(f"{x['text'][:120]} ({x['score']:+.2f})" for x in r["removed"])
            lines.append(f"- `{r['key']}` [{r['source']}] {removed}")
        lines.append("")
    return "\n".join(lines) + "\n"


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
