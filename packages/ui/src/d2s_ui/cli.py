"""``d2s ui RUN_DIR``: the page, served on 127.0.0.1 until interrupted.

The ``d2s`` command finds this subcommand through the entry-point group ``d2s.commands``
(``add_parser``), so the core package never imports this one. ``main(argv)`` runs it alone.
"""

from __future__ import annotations

import argparse
import logging
import sys

from d2s.config import ConfigError

from .config import DEFAULT_HOST, DEFAULT_PORT

log = logging.getLogger("d2s_ui")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ui",
        help="a local, read-only web page: search with a model, browse a corpus, compare runs",
        description="Serve the search, corpus and runs pages for a run directory (or explicit paths).",
    )
    p.add_argument("run_dir", nargs="?", help="a pipeline run dir: its shards, bundles, bench results and reports")
    p.add_argument("--shards", action="append", default=[], metavar="[NAME=]DIR", help="a shard directory (repeat)")
    p.add_argument("--images", action="append", default=[], metavar="[NAME=]DIR", help="a folder of images to search")
    p.add_argument("--bundle", action="append", default=[], metavar="[NAME=]DIR", help="an inference bundle (repeat)")
    p.add_argument("--results", action="append", default=[], metavar="[NAME=]DIR", help="a bench results dir (repeat)")
    p.add_argument("--report", action="append", default=[], metavar="[NAME=]DIR", help="a densecap report dir (repeat)")
    p.add_argument("--hf", action="append", default=[], metavar="NAME=MODEL", help="an HF dual encoder (CLIP, SigLIP)")
    p.add_argument("--cache-dir", help="where embeddings are cached (default ~/.cache/d2s-ui; never under a root)")
    p.add_argument("--engine", choices=("auto", "exact", "faiss"), default="auto", help="top-k engine")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(fn=run)
    return p


def config_from_args(args: argparse.Namespace):
    from .config import build_config

    return build_config(
        args.run_dir,
        shards=args.shards,
        images=args.images,
        bundles=args.bundle,
        results=args.results,
        reports=args.report,
        hf_models=args.hf,
        cache_dir=args.cache_dir,
        host=args.host,
        port=args.port,
        engine=args.engine,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import build_app

    cfg = config_from_args(args)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the page is reachable from other machines", cfg.host)
    log.info(
        "serving %d shard dir(s), %d model(s), %d run(s) on http://%s:%d/ (cache %s)",
        len(cfg.shards),
        len(cfg.bundles) + len(cfg.hf_models),
        len(cfg.results),
        cfg.host,
        cfg.port,
        cfg.cache_dir,
    )
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    from d2s.log import setup_logging

    ap = argparse.ArgumentParser(prog="d2s")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(["ui", *(sys.argv[1:] if argv is None else argv)])
    setup_logging()
    try:
        return args.fn(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
