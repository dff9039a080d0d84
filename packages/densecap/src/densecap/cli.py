"""The ``densecap`` command line.

    densecap run --source folder -S path=photos/ --caption-source vllm-server -C base_url=http://host:8000 --out out/
    densecap run --config densecap.yaml --set num_workers=4 --rank 0 --world-size 8
    densecap run ... --executor ray --ray-address auto --set executor.replicas=8   # a Ray cluster runs the units
    densecap sources | caption-sources | filters  # what is registered, with parameters
    densecap report OUT_DIR                       # rebuild the summary report
    densecap dedup OUT_DIR [OUT_DIR2 ...]         # corpus-wide duplicates -> OUT_DIR/integrity/dedup.json
    densecap contamination OUT_DIR --against shards:bench/world:test   # -> integrity/contamination.json
    densecap card OUT_DIR --license cc-by-4.0     # README.md (HF dataset card) + card.json
    densecap ground --input corpus/ --out grounded/ --scorer vse-bundle -P path=runs/q/stage1/bundle --action repair
                                                  # score the sentences of finished shards (resumable)

Exit status: 0 done; 2 bad configuration or bad input (a scorer that cannot be built, an image
it cannot decode, an empty caption: the message names it); 3 finished but some captions failed (recorded
with their error: rerun to fill them); 4 stopped because a caption source died; 5 another
densecap process is writing the same output directory and rank (the message names it);
130 / 143 interrupted by SIGINT / SIGTERM (one line says how many shards are finished; a rerun
continues).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from d2s.config import ConfigError, from_dict, load_yaml, parse_override
from d2s.log import add_log_level
from d2s.registry import describe_params, doc_line

from .caption_sources import CAPTION_SOURCES, CaptionSourceError
from .config import RunConfig
from .executors.base import EXECUTORS
from .filters import DEFAULT_FILTERS, FILTERS
from .images import IMAGE_SOURCES

log = logging.getLogger(__name__)


def catalogue(registry, indent: str = "  ", params: bool = True) -> str:
    lines = []
    for name, cls in registry.items():
        lines.append(f"{indent}{name}: {doc_line(cls)}")
        if params:
            for p in describe_params(cls):
                lines.append(f"{indent}    {p}")
    return "\n".join(lines)


def _epilog() -> str:
    return (
        "image sources (--source, parameters with -S KEY=VALUE):\n"
        + catalogue(IMAGE_SOURCES, params=False)
        + "\n\ncaption sources (--caption-source, parameters with -C [INDEX:]KEY=VALUE):\n"
        + catalogue(CAPTION_SOURCES, params=False)
        + f"\n\nfilters (--filters, default {','.join(DEFAULT_FILTERS)}; parameters with -F NAME.KEY=VALUE):\n"
        + catalogue(FILTERS, params=False)
        + "\n\n`densecap sources|caption-sources|filters` list every parameter with its default."
    )


def _set(doc: Any, path: list[str], value: Any, where: str) -> None:
    """Dotted path into nested dicts and lists (list items by index)."""
    cur = doc
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"{where}: {part!r} is not an index of a list of {len(cur)}")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                cur = cur.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: cannot set {'.'.join(path)}")


def _source_doc(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """--source, --input and -S into ``doc['source']``."""
    if args.source:
        doc["source"] = {"type": args.source, "params": {}}
    src = doc.setdefault("source", {"type": "shards", "params": {}})
    if args.input:
        src.setdefault("params", {})["path"] = args.input
    for o in args.source_opt:
        k, v = parse_override(o)
        _set(src.setdefault("params", {}), k, v, f"-S {o}")


def _caption_sources_doc(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """--caption-source and -C into ``doc['caption_sources']``."""
    if args.caption_source:
        doc["caption_sources"] = []
        for c in args.caption_source:
            typ, _, label = c.partition("=")
            doc["caption_sources"].append({"type": typ, "params": {}, **({"label": label} if label else {})})
    caps = doc.setdefault("caption_sources", [{"type": "synthetic-oracle"}])
    for o in args.caption_source_opt:
        idx, sep, rest = o.partition(":")
        if sep and idx.isdigit() and "=" not in idx:
            i, o2 = int(idx), rest
        else:
            i, o2 = 0, o
        if i >= len(caps):
            raise ConfigError(f"-C {o}: there is no caption source #{i} (have {len(caps)})")
        k, v = parse_override(o2)
        _set(caps[i].setdefault("params", {}), k, v, f"-C {o}")


def _filters_doc(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """--filters and -F into ``doc['filters']``."""
    if args.filters is not None:
        names = [] if args.filters.strip() in ("", "none") else [n.strip() for n in args.filters.split(",")]
        doc["filters"] = [{"type": n, "params": {}} for n in names]
    filters = doc.setdefault("filters", [{"type": n, "params": {}} for n in DEFAULT_FILTERS])
    for o in args.filter_opt:
        k, v = parse_override(o)
        match = [f for f in filters if f["type"] == k[0]]
        if not match or len(k) < 2:
            raise ConfigError(f"-F {o}: expected FILTER.KEY=VALUE with FILTER one of {[f['type'] for f in filters]}")
        _set(match[0].setdefault("params", {}), k[1:], v, f"-F {o}")


def _execution_doc(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """Where to write, this rank, workers, executor, progress and recaption flags."""
    for name in ("out", "report", "rank", "world_size", "num_workers", "batch_size"):
        v = getattr(args, name)
        if v is not None:
            doc[name] = v
    if args.executor:
        doc.setdefault("executor", {})["type"] = args.executor
    if args.ray_address is not None:
        ex = doc.setdefault("executor", {})
        ex["address"] = args.ray_address
        ex.setdefault("type", "ray")
    if args.no_progress:
        doc["progress"] = False
    if args.recaption:
        doc["recaption"] = True


def build_config(args: argparse.Namespace) -> RunConfig:
    """The config file, then the flags, then ``--set``, parsed into a :class:`RunConfig`."""
    doc: dict[str, Any] = load_yaml(args.config) if args.config else {}
    _source_doc(doc, args)
    _caption_sources_doc(doc, args)
    _filters_doc(doc, args)
    _execution_doc(doc, args)
    for o in args.set:
        k, v = parse_override(o)
        _set(doc, k, v, f"--set {o}")
    cfg = from_dict(RunConfig, doc, "config")
    # validate every plug-in's params now, before any work
    c = cfg
    IMAGE_SOURCES.parse_params(c.source.type, c.source.params, "source.params")
    for i, cs in enumerate(c.caption_sources):
        CAPTION_SOURCES.parse_params(cs.type, cs.params, f"caption_sources[{i}].params")
    for i, f in enumerate(c.filters):
        FILTERS.parse_params(f.type, f.params, f"filters[{i}].params")
    return cfg


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="densecap",
        description=__doc__.split("\n\n")[0] + " Dense captions for any image collection.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run",
        help="caption, filter and write shards (resumable)",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_what_args(r)
    _add_how_args(r)
    for name, what in (("sources", "image sources"), ("caption-sources", "caption sources"), ("filters", "filters")):
        sub.add_parser(name, help=f"list registered {what} and their parameters")
    g = sub.add_parser(
        "ground",
        help="score every sentence of finished shards against its image; drop or repair by the scores (resumable)",
        description="A densecap job over finished shards (source 'shards', no caption source, no filter) with "
        "grounding (docs/grounding.md). Stored scores of the same scorer are reused: a new --threshold or "
        "--action over shards scored before embeds nothing.",
    )
    _add_ground_args(g)
    _add_how_args(g)
    _add_integrity_parsers(sub)
    rep = sub.add_parser("report", help="(re)write the summary report of an output directory")
    rep.add_argument("out")
    rep.add_argument("--report", default=None)
    add_log_level(ap, sub)
    return ap


# argparse tables: one add_argument per flag (long, but flat and read top to bottom)
def _add_what_args(r: argparse.ArgumentParser) -> None:
    """What to caption: config file, image source, caption sources, filters."""
    r.add_argument("--config", help="YAML file with the config (fields of densecap.config.RunConfig)")
    r.add_argument("--source", help=f"image source type: {', '.join(IMAGE_SOURCES.names())}")
    r.add_argument("--input", help="shorthand for -S path=INPUT")
    r.add_argument(
        "-S", "--source-opt", action="append", default=[], metavar="KEY=VALUE", help="image source parameter"
    )
    r.add_argument(
        "--caption-source",
        dest="caption_source",
        action="append",
        metavar="TYPE[=LABEL]",
        help=f"caption source (repeat for several): {', '.join(CAPTION_SOURCES.names())}",
    )
    r.add_argument(
        "-C",
        "--caption-source-opt",
        dest="caption_source_opt",
        action="append",
        default=[],
        metavar="[I:]KEY=VALUE",
        help="parameter of caption source I (default 0), e.g. -C sampling.temperature=0.7",
    )
    r.add_argument("--filters", help=f"comma-separated filter list or 'none' (default {','.join(DEFAULT_FILTERS)})")
    r.add_argument("-F", "--filter-opt", action="append", default=[], metavar="FILTER.KEY=VALUE")


def _add_ground_args(g: argparse.ArgumentParser) -> None:
    """What to score and with what: input shards, scorer, action."""
    from d2s.grounding import CALIBRATIONS, SCORERS

    g.add_argument("--config", help="YAML file with the config (fields of densecap.config.RunConfig)")
    g.add_argument("--input", help="the finished shards to score (source 'shards')")
    g.add_argument("--scorer", help=f"sentence scorer (grounding.scorer.type): {', '.join(SCORERS.names())}")
    g.add_argument("-P", "--scorer-opt", action="append", default=[], metavar="KEY=VALUE", help="scorer parameter")
    g.add_argument("--action", choices=["score", "drop", "repair"], help="default score")
    g.add_argument("--threshold", type=float, help="a sentence scoring below it is unsupported (default 1.0)")
    g.add_argument("--min-caption-score", dest="min_caption_score", type=float, help="drop: caption mean below it")
    g.add_argument("--reference-images", dest="reference_images", type=int, help="calibration bank size (256)")
    g.add_argument("--calibration", choices=CALIBRATIONS, help="default sentence")
    g.add_argument("--sources", help="comma-separated caption-source labels to score (default: all)")


def build_ground_config(args: argparse.Namespace) -> RunConfig:
    """``densecap ground``: the config file, then the flags, then ``--set``."""
    doc: dict[str, Any] = load_yaml(args.config) if args.config else {}
    if args.input:
        doc["source"] = {"type": "shards", "params": {"path": args.input}}
    doc.setdefault("caption_sources", [])
    doc.setdefault("filters", [])
    g = doc.setdefault("grounding", {})
    if args.scorer:
        g.setdefault("scorer", {})["type"] = args.scorer
    for o in args.scorer_opt:
        k, v = parse_override(o)
        _set(g.setdefault("scorer", {}).setdefault("params", {}), k, v, f"-P {o}")
    for name in ("action", "threshold", "min_caption_score", "reference_images", "calibration"):
        if getattr(args, name) is not None:
            g[name] = getattr(args, name)
    if args.sources:
        g["sources"] = [x for x in args.sources.split(",") if x]
    if "scorer" not in g:
        raise ConfigError("grounding.scorer: required (--scorer NAME and -P KEY=VALUE, or a config file)")
    _execution_doc(doc, args)
    for o in args.set:
        k, v = parse_override(o)
        _set(doc, k, v, f"--set {o}")
    return from_dict(RunConfig, doc, "config")


def _add_how_args(r: argparse.ArgumentParser) -> None:
    """Where to write, with what share of the work and which executor; --set and --print-config."""
    r.add_argument("--out", help="output shard directory")
    r.add_argument("--report", help="report directory (default OUT/report)")
    r.add_argument("--num-workers", dest="num_workers", type=int)
    r.add_argument(
        "--executor",
        help=f"who runs the units (executor.type): {', '.join(EXECUTORS.names())}; default local (this process "
        "and --num-workers processes), ray: a Ray cluster",
    )
    r.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="auto|HOST:PORT|ray://HOST[:PORT]",
        help="the Ray cluster to join (implies --executor ray; checked before Ray starts, executor.connect_timeout); "
        "without it a local one is started",
    )
    r.add_argument("--rank", type=int)
    r.add_argument("--world-size", dest="world_size", type=int)
    r.add_argument("--batch-size", dest="batch_size", type=int)
    r.add_argument(
        "--recaption", action="store_true", help="caption again samples that already have a text from the source"
    )
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. caption_sources.0.label=x",
    )
    r.add_argument("--print-config", action="store_true", help="print the parsed config and exit")


def _add_integrity_parsers(sub) -> None:
    """``dedup``, ``contamination`` and ``card`` (docs/corpus-integrity.md)."""
    d = sub.add_parser(
        "dedup",
        help="corpus-wide duplicate images and dense texts over finished shards; writes DIR/integrity/dedup.json "
        "(resumable)",
        description="Perceptual hashes of every image and MinHash signatures of every kept dense text, one "
        "signature file per shard (a rerun skips finished ones), then clusters over all input directories. "
        "Parameters: --set params.image_distance=4, params.crops=false, params.text_threshold=0.7, ... "
        "(densecap.dedup.DedupParams); executor.* as for densecap run.",
    )
    d.add_argument("inputs", nargs="*", help="shard directories (e.g. every rank's output)")
    d.add_argument("--config", help="YAML file with the fields of densecap.dedup.DedupConfig")
    d.add_argument("--num-workers", dest="num_workers", type=int)
    d.add_argument("--executor", help=f"who computes the signatures: {', '.join(EXECUTORS.names())}")
    d.add_argument("--ray-address", dest="ray_address", help="implies --executor ray")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
    c = sub.add_parser(
        "contamination",
        help="training images that match an evaluation set (perceptual hash, optionally embeddings); writes "
        "DIR/integrity/contamination.json and matches.html",
    )
    c.add_argument("inputs", nargs="+", help="training shard directories")
    c.add_argument(
        "--against",
        action="append",
        default=[],
        required=True,
        metavar="SPEC",
        help="an evaluation set: shards:DIR[:SPLIT] (default split test), karpathy:JSON:IMAGE_ROOT[:SPLIT], "
        "folder:DIR (repeat for several)",
    )
    c.add_argument("--distance", type=int, default=None, help="max pHash distance in bits (default 4)")
    c.add_argument("--crop-distance", dest="crop_distance", type=int, default=None, help="whole vs crop (default 8)")
    c.add_argument("--bundle", help="a vse bundle: also flag pairs whose image embeddings are this similar")
    c.add_argument("--hf-encoder", dest="hf_encoder", help="a Hugging Face image encoder (name or folder) instead")
    c.add_argument("--similarity", type=float, default=0.95, help="embedding cosine threshold (default 0.95)")
    c.add_argument("--num-workers", dest="num_workers", type=int, help="processes computing the training signatures")
    c.add_argument("--executor", help=f"who computes the training signatures: {', '.join(EXECUTORS.names())}")
    c.add_argument("--ray-address", dest="ray_address", help="implies --executor ray")
    c.add_argument("--no-progress", action="store_true")
    k = sub.add_parser(
        "card",
        help="write README.md (Hugging Face dataset card) and card.json for a finished corpus",
    )
    k.add_argument("out", help="the corpus directory (shards with manifest.json)")
    k.add_argument("--license", default=None, help="licence id for the card (e.g. cc-by-4.0)")
    k.add_argument("--citation", default=None, help="BibTeX or text to cite the corpus")
    k.add_argument("--pretty-name", dest="pretty_name", default=None)
    k.add_argument("--description", default=None, help="a paragraph for the card's body")


def _dedup_main(args: argparse.Namespace) -> int:
    from d2s.integrity import CorpusError
    from d2s.processes import signals_interrupt
    from d2s.schema import SampleError

    from .dedup import dedup, parse_dedup_config

    try:
        doc: dict[str, Any] = load_yaml(args.config) if args.config else {}
        if args.inputs:
            doc["inputs"] = list(args.inputs)
        if args.num_workers is not None:
            doc["num_workers"] = args.num_workers
        if args.executor:
            doc.setdefault("executor", {})["type"] = args.executor
        if args.ray_address is not None:
            doc.setdefault("executor", {}).update(type="ray", address=args.ray_address)
        if args.no_progress:
            doc["progress"] = False
        for o in args.set:
            k, v = parse_override(o)
            _set(doc, k, v, f"--set {o}")
        cfg = parse_dedup_config(doc)
        with signals_interrupt():
            summary = dedup(cfg)
    except (ConfigError, CorpusError, SampleError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM through signals_interrupt
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"densecap dedup: interrupted ({signal.Signals(signum).name}); finished signature files are kept, "
            "rerun the same command to continue",
            file=sys.stderr,
        )
        return 128 + signum
    print(json.dumps(summary, indent=2))
    return 0


def _contamination_main(args: argparse.Namespace) -> int:
    from d2s.integrity import CorpusError
    from d2s.schema import SampleError

    from .contamination import ContaminationConfig, contamination

    try:
        doc: dict[str, Any] = {"inputs": list(args.inputs), "against": list(args.against)}
        for name in ("distance", "crop_distance", "bundle", "hf_encoder", "similarity", "num_workers"):
            if getattr(args, name) is not None:
                doc[name] = getattr(args, name)
        if args.executor:
            doc.setdefault("executor", {})["type"] = args.executor
        if args.ray_address is not None:
            doc.setdefault("executor", {}).update(type="ray", address=args.ray_address)
        doc["progress"] = not args.no_progress
        summary = contamination(from_dict(ContaminationConfig, doc, "config"))
    except (ConfigError, CorpusError, SampleError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _card_main(args: argparse.Namespace) -> int:
    from d2s.integrity import CorpusError

    from .card import CardConfig, write_card

    try:
        from pathlib import Path

        from .card import USER_FIELDS

        # a field not given keeps what the existing card says
        old = Path(args.out) / "card.json"
        doc = {k: v for k, v in json.loads(old.read_text()).items() if k in USER_FIELDS} if old.exists() else {}
        doc.update({k: getattr(args, k) for k in USER_FIELDS if getattr(args, k) is not None})
        summary = write_card(args.out, from_dict(CardConfig, doc, "card"))
    except (ConfigError, CorpusError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging

    ap = make_parser()
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    listings = {"sources": IMAGE_SOURCES, "caption-sources": CAPTION_SOURCES}
    if args.cmd in (*listings, "filters"):
        print(catalogue(listings.get(args.cmd, FILTERS), indent=""))
        return 0
    integrity = {"dedup": _dedup_main, "contamination": _contamination_main, "card": _card_main}
    if args.cmd in integrity:
        return integrity[args.cmd](args)
    if args.cmd == "report":
        from pathlib import Path

        from .report import write_report

        print(json.dumps(write_report(args.out, args.report or Path(args.out) / "report"), indent=2))
        return 0
    return _run(args, build_ground_config if args.cmd == "ground" else build_config)


def _run(args: argparse.Namespace, build) -> int:
    """``densecap run`` / ``ground``: the exit status the module docstring lists."""
    from d2s.grounding import ScorerError
    from d2s.processes import signals_interrupt
    from d2s.schema import SampleError

    from .locks import RunLocked
    from .run import RunInterrupted, run
    from .worker import RunAborted

    try:
        cfg = build(args)
        if args.print_config:
            from d2s.config import to_dict

            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        with signals_interrupt():  # SIGTERM too ends the run through its clean-up
            summary = run(cfg)
    except (ConfigError, FileNotFoundError, CaptionSourceError, ScorerError, SampleError) as exc:
        log.error("%s", exc)
        return 2
    except RunAborted as exc:
        log.error("%s", exc)
        return 4
    except RunLocked as exc:
        log.error("%s", exc)
        return 5
    except RunInterrupted as exc:
        print(exc, file=sys.stderr, flush=True)  # one line, no traceback
        return 128 + exc.signum
    print(json.dumps(summary, indent=2))
    if summary.get("caption_errors"):
        log.error(
            "%d caption(s) failed and are recorded with their error; rerun the same command to fill them",
            summary["caption_errors"],
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
