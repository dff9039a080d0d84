"""The data card of a finished corpus: ``densecap card OUT/`` and the ``densecap-card`` stage.

Writes, in the corpus directory (beside the shards, so the folder is one Hugging Face dataset):

- ``README.md``: a Hugging Face dataset card, a YAML header (``license``, ``pretty_name``,
  ``task_categories``, ``size_categories``, ``tags`` and ``configs``, whose ``data_files`` name the
  shards of each split, so ``datasets.load_dataset(OUT)`` reads exactly the shards) and a body that
  says what the corpus is made of;
- ``card.json``: the same facts as data: image sources and counts; each caption source's model,
  revision, prompt, prompt hash and sampling; the filters with their thresholds and verdict counts;
  score quantiles; the dedup and contamination counts (``integrity/``); licence and citation;
  a fingerprint of the corpus (shards' sizes and the integrity files) it was made from;
- ``card/scores_<name>.png``: the distribution of each stored caption score (matplotlib).

The card only reads the corpus. It follows the corpus: once a directory has a card, ``densecap
run`` (when it completes the shards), ``densecap dedup`` and ``densecap contamination`` rewrite it
with the user's fields kept (:func:`refresh_card`); in a pipeline the ``densecap-card`` stage
reruns whenever its inputs (the shards, the index stages) change.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2s.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from d2s.integrity import (
    CONTAMINATION_FILE,
    DEDUP_FILE,
    CorpusError,
    integrity_dir,
    read_contamination,
    read_dedup,
)
from d2s.shards import completed_shards, iter_records, read_manifest

log = logging.getLogger(__name__)

PLOTS_DIR = "card"
SCORE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class CardConfig:
    """What only the user knows: licence, citation, name (everything else is read from the corpus)."""

    license: str = "other"  # a Hugging Face licence id (cc-by-4.0, apache-2.0, ...) or 'other'
    citation: str = ""
    pretty_name: str = ""
    description: str = ""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def corpus_fingerprint(out: Path) -> str:
    """Hash of the complete shards' names and sizes and of the integrity index files."""
    h = hashlib.sha256()
    for p, st in sorted(completed_shards(out).items()):
        h.update(f"{Path(p).name}:{st['bytes']}\n".encode())
    for name in (DEDUP_FILE, CONTAMINATION_FILE):
        f = integrity_dir(out) / name
        if f.exists():
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _run_configs(out: Path) -> list[dict]:
    docs = []
    for p in sorted(out.glob("densecap-config.rank*.json")):
        try:
            docs.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            log.warning("%s: not JSON; left out of the card", p)
    return docs


def _filters(configs: list[dict]) -> list[dict]:
    """The filters of the densecap run with every parameter (defaults filled in)."""
    from d2s.config import to_dict

    from .filters import FILTERS

    if not configs:
        return []
    out = []
    for i, f in enumerate(configs[0].get("filters") or []):
        params = FILTERS.parse_params(f["type"], f.get("params") or {}, f"filters[{i}].params")
        out.append({"type": f["type"], "params": to_dict(params) if params is not None else {}})
    return out


def collect(out: Path, cfg: CardConfig) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Everything the card says, read from the corpus directory, and the raw scores (for the plots)."""
    try:
        manifest = read_manifest(out)
    except FileNotFoundError as exc:
        raise CorpusError(str(exc)) from None
    shards = completed_shards(out)
    if not shards or not sum(s["count"] for s in shards.values()):
        raise CorpusError(f"{out}: the corpus is empty (no complete shard with samples)")
    images: Counter = Counter()
    sources: dict[tuple, dict] = {}
    verdicts: dict[str, Counter] = defaultdict(Counter)
    scores: dict[str, list[float]] = defaultdict(list)
    for rec in iter_records(sorted(shards)):
        doc = json.loads(rec["json"])
        images[(doc.get("split", ""), doc.get("dataset", ""))] += 1
        for d in doc.get("dense", []):
            k = (d["source"], d.get("model", ""), d.get("prompt", ""), json.dumps(d.get("params", {}), sort_keys=True))
            e = sources.setdefault(k, {"captions": 0})
            e["captions"] += 1
            verdicts[d["source"]][d.get("verdict", "keep") if not d.get("error") else "error"] += 1
            for name, v in (d.get("scores") or {}).items():
                scores[name].append(float(v))
    configs = _run_configs(out)
    cap_params = {
        c.get("label") or c["type"]: c.get("params", {})
        for c in (configs[0].get("caption_sources", []) if configs else [])
    }
    caption_sources = [
        {
            "label": label,
            "model": model,
            "revision": str(cap_params.get(label, {}).get("revision", "")),
            "prompt": prompt,
            "prompt_hash": prompt_hash(prompt),
            "sampling": json.loads(params),
            "captions": e["captions"],
        }
        for (label, model, prompt, params), e in sorted(sources.items())
    ]
    import numpy as np

    score_stats = {
        name: {
            "count": len(v),
            **{f"p{int(q * 100)}": round(float(np.quantile(v, q)), 4) for q in SCORE_QUANTILES},
        }
        for name, v in sorted(scores.items())
    }
    dedup = read_dedup(out)
    cont = read_contamination(out)
    return {
        "pretty_name": cfg.pretty_name or out.name,
        "license": cfg.license,
        "citation": cfg.citation,
        "description": cfg.description,
        "splits": {k: v["count"] for k, v in manifest["splits"].items()},
        "images": sum(images.values()),
        "image_sources": [{"split": sp, "dataset": ds, "images": n} for (sp, ds), n in sorted(images.items())],
        "image_source_config": configs[0].get("source") if configs else None,
        "caption_sources": caption_sources,
        "filters": _filters(configs),
        "verdicts": {src: dict(c) for src, c in sorted(verdicts.items())},
        "scores": score_stats,
        "dedup": (dedup or {}).get("counts"),
        "dedup_params": (dedup or {}).get("params"),
        "contamination": None
        if cont is None
        else {"against": cont.get("against"), "embedding": cont.get("embedding"), **cont.get("counts", {})},
        "fingerprint": corpus_fingerprint(out),
    }, dict(scores)


def _plots(out: Path, scores: dict[str, list[float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / PLOTS_DIR
    d.mkdir(exist_ok=True)
    names = []
    for name, v in sorted(scores.items()):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(v, bins=40)
        ax.set_xlabel(name)
        ax.set_ylabel("captions")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=90, format="png")
        plt.close(fig)
        atomic_write_bytes(d / f"scores_{name}.png", buf.getvalue())
        names.append(f"{PLOTS_DIR}/scores_{name}.png")
    return names


def _yaml_header(card: dict, splits: dict[str, list[str]]) -> str:
    import yaml

    header = {
        "license": card["license"],
        "pretty_name": card["pretty_name"],
        "task_categories": ["image-to-text", "text-to-image"],
        "size_categories": [_size_category(card["images"])],
        "tags": ["dense-captions", "webdataset", "d2s-vse"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": sp, "path": [f"{sp}-*.tar"]} for sp in sorted(splits)],
            }
        ],
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def _body(card: dict, plots: list[str]) -> str:
    lines = [f"# {card['pretty_name']}", ""]
    if card["description"]:
        lines += [card["description"], ""]
    lines += [
        "Images with sparse captions and dense texts, in WebDataset shards (d2s-vse shard format, "
        "`docs/shard-format.md`). Written by `densecap card`; every figure below is in `card.json`.",
        "",
        "## Images",
        "",
        "| split | origin | images |",
        "|---|---|---|",
    ]
    lines += [f"| {r['split']} | {r['dataset']} | {r['images']} |" for r in card["image_sources"]]
    lines += ["", "## Caption sources", "", "| source | model | revision | prompt hash | sampling | captions |"]
    lines += ["|---|---|---|---|---|---|"]
    for c in card["caption_sources"]:
        sampling = json.dumps(c["sampling"], sort_keys=True)
        lines.append(
            f"| {c['label']} | {c['model']} | {c['revision'] or '-'} | `{c['prompt_hash']}` | `{sampling}` | {c['captions']} |"
        )
    for c in card["caption_sources"]:
        if c["prompt"]:
            lines += ["", f"Prompt of `{c['label']}` (`{c['prompt_hash']}`):", "", "```", c["prompt"], "```"]
    lines += ["", "## Filters", ""]
    for f in card["filters"]:
        lines.append(f"- `{f['type']}`: {json.dumps(f['params'], sort_keys=True)}")
    if not card["filters"]:
        lines.append("(none recorded)")
    lines += ["", "Verdicts per caption source:", "", "```json", json.dumps(card["verdicts"], indent=1), "```"]
    lines += ["", "## Scores", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "```json", json.dumps(card["scores"], indent=1), "```", "", "## Duplicates and contamination", ""]
    lines.append(
        f"Deduplication (`densecap dedup`): {json.dumps(card['dedup'])}"
        if card["dedup"]
        else "Deduplication: not run (`densecap dedup`)."
    )
    lines.append("")
    lines.append(
        f"Contamination (`densecap contamination`): {json.dumps(card['contamination'])}"
        if card["contamination"]
        else "Contamination: not checked (`densecap contamination`)."
    )
    lines += ["", "## Licence", "", card["license"], ""]
    if card["citation"]:
        lines += ["## Citation", "", "```bibtex", card["citation"], "```", ""]
    return "\n".join(lines) + "\n"


def write_card(out: str | Path, cfg: CardConfig | None = None) -> dict[str, Any]:
    """Write ``README.md``, ``card.json`` and the score plots in ``out``; returns the card's facts."""
    out = Path(out)
    if not out.is_dir():
        raise CorpusError(f"{out} does not exist or is not a directory")
    card, scores = collect(out, cfg or CardConfig())
    plots = _plots(out, scores)
    splits = {sp: v for sp, v in read_manifest(out)["splits"].items()}
    atomic_write_json(out / "card.json", {**card, "plots": plots})
    atomic_write_text(out / "README.md", _yaml_header(card, splits) + "\n" + _body(card, plots))
    log.info("data card written to %s/README.md", out)
    return {k: card[k] for k in ("pretty_name", "images", "splits", "fingerprint", "dedup", "contamination")}


USER_FIELDS = ("license", "citation", "pretty_name", "description")


def refresh_card(out: str | Path) -> bool:
    """Rewrite the card of ``out`` if it has one (``card.json``), with the user's fields it holds:
    what ``densecap run``, ``dedup`` and ``contamination`` call when they change the corpus. A card
    that cannot be rewritten is left as it was, with a warning (the corpus itself is fine)."""
    path = Path(out) / "card.json"
    if not path.exists():
        return False
    try:
        doc = json.loads(path.read_text())
        write_card(out, CardConfig(**{k: str(doc.get(k) or "") for k in USER_FIELDS}))
    except (CorpusError, ValueError, OSError) as exc:
        log.warning("%s: the data card was not updated: %s (rerun `densecap card %s`)", out, exc, out)
        return False
    return True
