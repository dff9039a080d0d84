"""How well sentence scorers find planted false sentences, per error kind; and what scoring costs.

Reads a corpus captioned by the ``synthetic-errors`` source (every sentence's truth is
known), scores every sentence with each scorer, and prints per error kind: AUROC (true
sentences against false sentences of that kind; 95% bootstrap interval over images),
precision and recall at the default threshold. Scorers: ``vse-bundle`` with each bundle
given, and the text-only floor (the ``grounding`` filter's measure per sentence: the share
of its content words that the image's sparse captions use). Then the throughput of the
grounding step next to the plain forward pass of the same encoder on the same batches.

    .venv/bin/d2s run pipelines/grounding.yaml --run-dir runs/grounding
    .venv/bin/python benchmarks/grounding_auroc.py --run-dir runs/grounding

Prints markdown tables and writes JSON (``--out``). Figures: docs/grounding.md.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from d2s.grounding import CALIBRATIONS, SCORERS, GroundingAction, ReferenceBank, score_batch, split_sentences
from d2s.schema import Sample
from d2s.shards import iter_samples, split_shards

DEFAULT_THRESHOLD = GroundingAction().threshold
FLOOR_THRESHOLD = 0.1  # the grounding filter's default min_overlap


def load(corpus: Path, split: str, n: int) -> list[Sample]:
    out = []
    for s in iter_samples(split_shards(corpus, split)):
        if any(d.truth for d in s.dense):
            out.append(s)
        if len(out) >= n:
            break
    if not out:
        raise SystemExit(f"{corpus}: no sample of split {split!r} has planted-error truth (synthetic-errors source)")
    return out


def truth_rows(samples: list[Sample]) -> tuple[list, list[tuple[int, str, str]], int]:
    """The (sample, dense text) pairs to score, (image index, sentence, label) for each of their
    sentences, and how many texts split differently from their truth (those are left out)."""
    items, rows, mismatched = [], [], 0
    for i, s in enumerate(samples):
        for d in s.dense:
            if not d.truth:
                continue
            if split_sentences(d.original_text or d.text) != [t.text for t in d.truth]:
                mismatched += 1
                continue
            items.append((s, d))
            rows += [(i, t.text, t.label) for t in d.truth]
    return items, rows, mismatched


def bundle_scores(path: str, samples: list[Sample], items: list, bank_size: int, batch: int, calibration: str):
    """The calibrated score of every sentence of ``items``, in order."""
    scorer = SCORERS.create("vse-bundle", {"path": path, "progress": False}, "scorer")
    bank = ReferenceBank.build(scorer, samples, bank_size)
    score = []
    for i in range(0, len(items), batch):
        for sents in score_batch(scorer, bank, items[i : i + batch], calibration):
            score += [x.score for x in sents]
    return np.array(score)


def choose_calibration(corpus: Path, split: str, path: str, a) -> tuple[str, dict[str, float]]:
    """The calibration with the highest all-kinds AUROC on a validation corpus (other images)."""
    samples = load(corpus, split, a.images)
    items, rows, _ = truth_rows(samples)
    labels = np.array([r[2] for r in rows])
    found = {}
    for mode in CALIBRATIONS:
        s = bundle_scores(path, samples, items, a.reference_images, a.batch_size, mode)
        found[mode] = round(auroc(s[labels == "true"], s[labels != "true"]), 4)
    return max(found, key=found.get), found


def floor_scores(samples: list[Sample], rows: list[tuple[int, str, str]]) -> np.ndarray:
    from densecap.filters import content_words

    refs = [set().union(*(content_words(c) for c in s.sparse)) if s.sparse else set() for s in samples]
    out = []
    for i, text, _ in rows:
        words = content_words(text)
        out.append(len(words & refs[i]) / len(words) if words else 0.0)
    return np.array(out)


def auroc(true_scores: np.ndarray, false_scores: np.ndarray) -> float:
    """P(a true sentence scores above a false one), ties counting one half (Mann-Whitney)."""
    both = np.concatenate([true_scores, false_scores])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n1, n0 = len(true_scores), len(false_scores)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# The sentence forms of the synthetic world's descriptions (evaluation-side knowledge: no
# scorer sees it). An error is compared with the true sentences of the form it imitates, so
# that a kind's AUROC measures the error, not how the scene sentence differs from an object one.
_FORMS = [
    ("object", re.compile(r"^At the .+ there is an? ")),
    ("relation", re.compile(r" is (?:above|below|left of|right of) ")),
]
KIND_FORM = {
    "absent_object": "object",
    "wrong_color": "object",
    "wrong_size": "object",
    "wrong_position": "object",
    "wrong_relation": "relation",
    "wrong_scene": "scene",
    "wrong_count": "scene",
    "filler": None,  # against every true sentence
}


def sentence_form(text: str) -> str:
    for name, rx in _FORMS:
        if rx.search(text):
            return name
    return "scene" if " scene " in f" {text} " and " objects." in text else "other"


def per_kind(scores: np.ndarray, rows, threshold: float, n_images: int, boot: int, seed: int) -> dict:
    """Per error kind: AUROC against the true sentences of the same form (95% bootstrap interval
    over images) and against every true sentence; recall and precision at ``threshold``."""
    labels = np.array([r[2] for r in rows])
    forms = np.array([sentence_form(r[1]) for r in rows])
    images = np.array([r[0] for r in rows])
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n_images, n_images) for _ in range(boot)]
    true = labels == "true"
    flagged = scores < threshold
    out = {}
    for kind in sorted(set(labels) - {"true"}) + ["all"]:
        false = labels != "true" if kind == "all" else labels == kind
        form = KIND_FORM.get(kind)
        matched = true & (forms == form) if form else true
        lo, hi = _boot_interval(scores, matched, false, images, draws)
        tp, fp = int((flagged & false).sum()), int((flagged & matched).sum())
        out[kind] = {
            "n": int(false.sum()),
            "n_true_matched": int(matched.sum()),
            "auroc": round(auroc(scores[matched], scores[false]), 4),
            "auroc_95": [round(lo, 4), round(hi, 4)],
            "auroc_vs_all_true": round(auroc(scores[true], scores[false]), 4),
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / false.sum(), 4),
        }
    out["true"] = {"n": int(true.sum()), "flagged": round(float(flagged[true].mean()), 4)}
    return out


def _boot_interval(scores, true, false, images, draws) -> tuple[float, float]:
    """Percentile interval of AUROC over resampled images (a sentence goes with its image)."""
    by_image = defaultdict(list)
    for j, im in enumerate(images):
        by_image[int(im)].append(j)
    vals = []
    for draw in draws:
        idx = np.concatenate([by_image[int(i)] for i in draw if int(i) in by_image])
        t, f = idx[true[idx]], idx[false[idx]]
        if len(t) and len(f):
            vals.append(auroc(scores[t], scores[f]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def throughput(path: str, samples: list[Sample], bank_size: int, batch: int, repeats: int) -> dict:
    """Sentences/s of the grounding step (split, embed, calibrate, act) and of the plain forward
    pass of the same encoder on the same images and sentences, alternated in the same run."""
    from densecap.grounding import Grounder, GroundingConfig, ScorerConfig

    cfg = GroundingConfig(ScorerConfig("vse-bundle", {"path": path, "progress": False}), batch_size=batch)
    grounder = Grounder(cfg, lambda: samples)
    grounder.bank()  # built once per worker: left out of both timings (reported apart)
    scorer = grounder.scorer
    batches = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    sentences = [[t for s in b for d in s.dense if d.truth for t in split_sentences(d.text)] for b in batches]
    n = sum(len(x) for x in sentences)
    t_full, t_plain = [], []
    for r in range(repeats):
        fresh = [[_copy(s) for s in b] for b in batches]
        for which in ("plain", "full") if r % 2 == 0 else ("full", "plain"):  # alternate the order
            t0 = time.perf_counter()
            if which == "plain":
                for b, sents in zip(batches, sentences):
                    scorer.embed_images([s.image for s in b], [s.key for s in b])
                    scorer.embed_texts(sents)
                t_plain.append(time.perf_counter() - t0)
            else:
                for b in fresh:
                    grounder.ground(b, Counter(), [])
                t_full.append(time.perf_counter() - t0)
    full, plain = float(np.median(t_full)), float(np.median(t_plain))
    return {
        "sentences": n,
        "grounding_sentences_per_s": round(n / full, 1),
        "forward_sentences_per_s": round(n / plain, 1),
        "overhead": round(full / plain - 1, 4),
        "repeats": repeats,
    }


def _copy(s: Sample) -> Sample:
    return Sample.from_json_dict(s.key, s.json_dict(), {s.image_ext: s.image})


def table(results: dict) -> str:
    kinds = [k for k in next(iter(results.values())) if k not in ("true",)]
    lines = [
        "| error kind | n | " + " | ".join(f"{name}: AUROC [95%] (vs all true) / P / R" for name in results) + " |"
    ]
    lines.append("|---|---|" + "---|" * len(results))
    for k in kinds:
        cells = []
        for r in results.values():
            x = r[k]
            p = "-" if x["precision"] is None else f"{x['precision']:.2f}"
            cells.append(
                f"{x['auroc']:.3f} [{x['auroc_95'][0]:.3f}, {x['auroc_95'][1]:.3f}] ({x['auroc_vs_all_true']:.3f})"
                f" / {p} / {x['recall']:.2f}"
            )
        lines.append(f"| {k} | {next(iter(results.values()))[k]['n']} | " + " | ".join(cells) + " |")
    flags = " | ".join(f"{r['true']['flagged']:.2f}" for r in results.values())
    lines.append(f"| true sentences flagged | {next(iter(results.values()))['true']['n']} | {flags} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a run of pipelines/grounding.yaml")
    ap.add_argument("--corpus", type=Path, help="shards with planted-error truth (default RUN/planted/shards)")
    ap.add_argument(
        "--bundle",
        action="append",
        default=[],
        help="NAME=PATH (default: the run dir's scorer, memorised and sentence_scorer)",
    )
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--reference-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=4, help="throughput repeats (median; order alternates)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: the project's CPU machines)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", action="append", choices=CALIBRATIONS, help="default: all of them")
    ap.add_argument(
        "--select-on", type=Path, help="validation corpus for the calibration (default RUN/planted_val/shards)"
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.run_dir is None and (a.corpus is None or not a.bundle):
        ap.error("give --run-dir, or --corpus and --bundle")
    corpus = a.corpus or a.run_dir / "planted" / "shards"
    bundles = dict(b.split("=", 1) for b in a.bundle) or {
        "scorer (other images)": str(a.run_dir / "scorer" / "bundle"),
        "memorised (same images)": str(a.run_dir / "memorised" / "bundle"),
        "sentence scorer (other images)": str(a.run_dir / "sentence_scorer" / "bundle"),
    }
    chosen = {}
    if a.select_on or a.run_dir:
        val = a.select_on or a.run_dir / "planted_val" / "shards"
        for name, path in bundles.items():
            chosen[name], found = choose_calibration(val, a.split, path, a)
            print(f"calibration for {name}, all-kinds AUROC on {val}: {found} -> {chosen[name]}")
    samples = load(corpus, a.split, a.images)
    items, rows, mismatched = truth_rows(samples)
    print(f"{len(samples)} images, {len(rows)} sentences ({Counter(r[2] for r in rows)}), {mismatched} texts skipped")
    results = {}
    for name, path in bundles.items():
        for mode in a.calibration or CALIBRATIONS:
            scores = bundle_scores(path, samples, items, a.reference_images, a.batch_size, mode)
            # 'none' is the raw cosine: its threshold is the median score (no fixed meaning)
            threshold = DEFAULT_THRESHOLD if mode != "none" else float(np.median(scores))
            mark = " (chosen)" if chosen.get(name) == mode else ""
            results[f"{name}, {mode}{mark}"] = per_kind(scores, rows, threshold, len(samples), a.bootstrap, a.seed)
    floor = floor_scores(samples, rows)
    results["text-only floor"] = per_kind(floor, rows, FLOOR_THRESHOLD, len(samples), a.bootstrap, a.seed)
    print(table(results))
    speed = throughput(next(iter(bundles.values())), samples, a.reference_images, a.batch_size, a.repeats)
    print(json.dumps(speed))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"auroc": results, "throughput": speed, "args": vars(a)}, indent=2, default=str))


if __name__ == "__main__":
    main()
