"""``bench`` command line: ``bench retrieval`` and ``bench compare``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from d2s.config import ConfigError
from d2s.log import add_log_level, setup_logging
from d2s.retrieval import DEFAULT_CHUNK_SIZE, RetrievalInputError, get_protocol, list_protocols
from d2s.schema import SampleError

from .api import (
    BenchResults,
    RetrievalSettings,
    embed_eval_set,
    embeddings_info,
    evaluate_embeddings,
    load_embeddings,
    load_encoder,
    model_info,
    read_results,
    save_embeddings,
    write_results,
)
from .data import DatasetError, load_karpathy, load_shards
from .datasets import BENCHMARKS, load_benchmark

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench", description="Exact image-text retrieval benchmarks, tables and plots.")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("retrieval", help="evaluate a model bundle on a dataset, or saved embeddings")
    src = r.add_argument_group("source (a bundle + a dataset, or saved embeddings)")
    src.add_argument("--bundle", help="model bundle directory (vse.bundle.load_bundle)")
    src.add_argument("--karpathy", help="Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json)")
    src.add_argument("--image-root", help="image root for --karpathy")
    src.add_argument("--shards", help="this project's shards directory")
    src.add_argument(
        "--benchmark",
        choices=BENCHMARKS.names(),
        help="a published long-caption set (docs/benchmarks.md), read from --data-root; evaluated under its protocol",
    )
    src.add_argument("--data-root", help="directory of the --benchmark files as published (urban1k: hf://... also)")
    src.add_argument("--docci-root", help="iiw: the DOCCI directory (images/, images_aar/)")
    src.add_argument("--dci-root", help="iiw: the DCI directory (densely_captioned_images/photos/)")
    src.add_argument("--split", default="test", help="split to evaluate (default: test)")
    src.add_argument("--max-captions", type=int, default=5, help="captions per image kept (0 = all; default 5)")
    src.add_argument("--embeddings", help="one .safetensors with img, txt[, txt_to_img, dense, dense_img]")
    src.add_argument("--img-emb", help="image embeddings .npy or .safetensors[:KEY]")
    src.add_argument("--txt-emb", help="text embeddings .npy or .safetensors[:KEY]")
    src.add_argument("--txt-to-img", help="caption -> image index (.npy/.json/.txt); default j // (M // N)")
    src.add_argument("--save-embeddings", help="also save the model's embeddings here (.safetensors)")
    r.add_argument(
        "--protocol",
        action="append",
        choices=[p for p in list_protocols() if p != "long_text"],
        help="sparse-caption protocol (repeatable; default custom)",
    )
    r.add_argument("--no-long-text", action="store_true", help="skip image <-> long-text retrieval")
    r.add_argument("--ties", choices=["stable", "optimistic", "pessimistic"], default="stable")
    r.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="images per similarity block")
    r.add_argument("--engine", choices=["exact", "faiss"], default="exact")
    r.add_argument("--faiss-k", type=int, default=100, help="top-k searched by the FAISS engine")
    r.add_argument("--image-batch-size", type=int, default=64)
    r.add_argument("--text-batch-size", type=int, default=256)
    r.add_argument("--device", default=None, help="torch device for encoding and ranking (default cpu)")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for intervals (0: none)")
    r.add_argument("--bootstrap-seed", type=int, default=0)
    r.add_argument("--interval-level", type=float, default=0.95, help="interval coverage (default 0.95)")
    r.add_argument("--name", help="run name shown in tables (default: bundle or embeddings file name)")
    r.add_argument("--out", required=True, help="results directory (results.json + results.md)")

    c = sub.add_parser("compare", help="several results side by side + recall@K curves")
    c.add_argument("results", nargs="+", help="results.json files or results directories")
    c.add_argument("--out", required=True, help="directory for compare.csv, compare.md, recall_curves.png")
    c.add_argument(
        "--reference", help="run name the paired differences are taken against (default: the first results given)"
    )
    pr = sub.add_parser("protocols", help="every protocol: images, subset, text rule, the published table it follows")
    add_log_level(ap, [r, c, pr])
    return ap


def cmd_retrieval(args: argparse.Namespace) -> BenchResults:
    if args.benchmark and args.protocol:
        raise RetrievalInputError(f"--benchmark {args.benchmark} brings its own protocol: leave out --protocol")
    protocols = [BENCHMARKS.get(args.benchmark).protocol] if args.benchmark else args.protocol or ["custom"]
    settings = RetrievalSettings(
        protocols=protocols,
        long_text=not args.no_long_text and not args.benchmark,
        chunk_size=args.chunk_size,
        ties=args.ties,
        engine=args.engine,
        faiss_k=args.faiss_k,
        image_batch_size=args.image_batch_size,
        text_batch_size=args.text_batch_size,
        device=args.device,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
        interval_level=args.interval_level,
    )
    t0 = time.perf_counter()
    data = None
    saved = args.embeddings or args.img_emb or args.txt_emb
    if saved and args.bundle:
        raise RetrievalInputError("give either --bundle with a dataset, or saved embeddings, not both")
    if saved:
        emb = load_embeddings(args.embeddings, img=args.img_emb, txt=args.txt_emb, txt_to_img=args.txt_to_img)
        source = {
            k: v
            for k, v in (
                ("embeddings", args.embeddings),
                ("img_emb", args.img_emb),
                ("txt_emb", args.txt_emb),
                ("txt_to_img", args.txt_to_img),
            )
            if v
        }
        name = args.name or Path(args.embeddings or args.img_emb).stem
        model = embeddings_info({k: v for k, v in source.items() if k != "txt_to_img"})  # the mapping is data
    elif args.bundle:
        if sum(map(bool, (args.karpathy, args.shards, args.benchmark))) != 1:
            raise RetrievalInputError(
                "--bundle needs exactly one dataset: --karpathy JSON --image-root DIR, --shards DIR, "
                "or --benchmark NAME --data-root DIR"
            )
        if args.benchmark:
            roots = {"root": args.data_root, "docci_root": args.docci_root, "dci_root": args.dci_root}
            data = load_benchmark(args.benchmark, {k: v for k, v in roots.items() if v})
            source = {"bundle": args.bundle, "benchmark": args.benchmark, **{k: v for k, v in roots.items() if v}}
        elif args.karpathy:
            if not args.image_root:
                raise RetrievalInputError("--karpathy needs --image-root")
            data = load_karpathy(args.karpathy, args.image_root, args.split, args.max_captions)
            source = {"bundle": args.bundle, "karpathy": args.karpathy, "split": args.split}
        else:
            data = load_shards(args.shards, args.split, args.max_captions)
            source = {"bundle": args.bundle, "shards": args.shards, "split": args.split}
        encoder = load_encoder(args.bundle, args.device)
        emb = embed_eval_set(encoder, data, settings)
        if args.save_embeddings:
            save_embeddings(emb, args.save_embeddings)
        name = args.name or Path(args.bundle).name
        model = model_info(args.bundle, encoder)
    else:
        raise RetrievalInputError(
            "nothing to evaluate: give --bundle with a dataset, or --embeddings / --img-emb + --txt-emb"
        )
    results = BenchResults(
        name, evaluate_embeddings(emb, settings, data=data, model=model), source, _settings_dict(settings)
    )
    results.seconds = time.perf_counter() - t0
    js, md = write_results(results, args.out)
    sys.stdout.write(md.read_text())
    log.info("wrote %s and %s", js, md)
    return results


def _settings_dict(s: RetrievalSettings) -> dict:
    from d2s.config import to_dict

    return to_dict(s)


def cmd_compare(args: argparse.Namespace) -> dict:
    from .compare import compare

    runs = [read_results(p) for p in args.results]
    paths = compare(runs, args.out, reference=args.reference)
    sys.stdout.write(paths["markdown"].read_text())
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def protocols_table() -> str:
    """Markdown: every registered protocol, and the ``--benchmark`` that loads its published files."""
    by_protocol = {BENCHMARKS.get(b).protocol: b for b in BENCHMARKS.names()}
    lines = [
        "| protocol | --benchmark | images | folds | subset | texts | follows |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_protocols():
        p = get_protocol(name)
        cells = [name, by_protocol.get(name, ""), str(p.n_images or "any"), str(p.n_folds)]
        cells += [p.subset or p.description, p.texts or "as given", p.reproduces or ""]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "retrieval":
            cmd_retrieval(args)
        elif args.command == "protocols":
            sys.stdout.write(protocols_table())
        else:
            cmd_compare(args)
    except (RetrievalInputError, DatasetError, SampleError, ConfigError, FileNotFoundError, KeyError) as exc:
        # once, through logging (stderr), naming the command
        log.error("bench %s: %s", args.command, exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
