"""``d2s``: run pipelines, list stage types, write the synthetic world, inspect shards."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from .config import ConfigError
from .log import add_log_level, setup_logging

log = logging.getLogger("d2s")


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import Runner, load_pipeline, write_run_record

    p = load_pipeline(args.pipeline, args.overrides, run_dir=args.run_dir)
    logfile = None if args.dry_run else write_run_record(p)
    setup_logging(args.log_level, logfile)
    log.info("pipeline %s -> %s", p.name, p.run_dir)
    try:
        report = Runner(p).run(
            from_stage=args.from_stage, until=args.until, dry_run=args.dry_run, force=args.force, jobs=args.jobs
        )
    except KeyboardInterrupt as exc:  # SIGINT; SIGTERM too while stages run at once (--jobs)
        signum = getattr(exc, "signum", signal.SIGINT)
        log.error("interrupted by %s; a rerun of the same command resumes", signal.Signals(signum).name)
        return 128 + signum
    if args.dry_run:
        print(json.dumps(report, indent=2))
    else:
        ran = [r["stage"] for r in report if r.get("action") == "run"]
        log.info(
            "finished: ran %s; cached %s", ran or "nothing", [r["stage"] for r in report if r.get("action") == "skip"]
        )
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    import dataclasses

    from .pipeline import load_stage_type, stage_types

    for name, target in sorted(stage_types().items()):
        cls = load_stage_type(name, f"stage type {name}")
        print(f"{name}  ({target})")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        if dataclasses.is_dataclass(cls.Params):
            for f in dataclasses.fields(cls.Params):
                default = (
                    f.default
                    if f.default is not dataclasses.MISSING
                    else ("<factory>" if f.default_factory is not dataclasses.MISSING else "<required>")
                )
                print(f"    params.{f.name} = {default!r}")
        for k, v in cls.inputs.items():
            print(f"    inputs.{k}: {v}")
        for k, v in cls.outputs.items():
            print(f"    outputs.{k}: {v}")
    return 0


def _cmd_world(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .synthetic import SplitSpec, WorldConfig, write_world

    world = from_dict(WorldConfig, {"world_seed": args.world_seed, "image_size": args.image_size}, "world")
    specs = []
    for item in args.split:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise ConfigError(f"--split {item!r}: expected NAME=COUNT, e.g. train=1000")
        specs.append(SplitSpec(name, int(n), args.seed, args.group_size if name != "train" else 1))
    manifest = write_world(args.out, world, specs, shard_size=args.shard_size, num_workers=args.num_workers)
    print(json.dumps({k: v["count"] for k, v in manifest["splits"].items()}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .shards import iter_samples, read_manifest, split_shards

    manifest = read_manifest(args.dir)
    print(
        json.dumps(
            {k: {"count": v["count"], "shards": len(v["shards"])} for k, v in manifest["splits"].items()}, indent=2
        )
    )
    split = args.split or next(iter(manifest["splits"]))
    for i, s in enumerate(iter_samples(split_shards(args.dir, split))):
        if i >= args.n:
            break
        print(f"--- {s.key} ({s.image_ext}, {len(s.image)} bytes)")
        for c in s.sparse:
            print(f"  sparse: {c}")
        for d in s.dense:
            print(f"  dense [{d.source}, {d.verdict}]: {d.text[:300]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="d2s", description="D2S-VSE pipelines and shared tools")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a pipeline YAML (cached stages are skipped)")
    r.add_argument("pipeline", help="pipeline file, e.g. pipelines/quickstart.yaml")
    r.add_argument("overrides", nargs="*", help="KEY=VALUE overrides: vars.seed=1, train.params.steps=50")
    r.add_argument("--from", dest="from_stage", help="(re)run from this stage on; earlier stages must have completed")
    r.add_argument("--until", help="stop after this stage")
    r.add_argument("--dry-run", action="store_true", help="validate everything and show what would run")
    r.add_argument("--force", action="store_true", help="rerun selected stages even if cached")
    r.add_argument("--run-dir", help="override the pipeline's run_dir")
    r.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="run up to N stages at once, each in its own process, a stage as soon as its inputs are done (default 1)",
    )
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("stages", help="list registered stage types with their params, inputs and outputs")
    s.set_defaults(fn=_cmd_stages)

    w = sub.add_parser("world", help="write synthetic-world shards")
    w.add_argument("--out", required=True)
    w.add_argument("--split", action="append", default=[], help="NAME=COUNT, repeatable (default train=1000)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--world-seed", type=int, default=0)
    w.add_argument("--image-size", type=int, default=64)
    w.add_argument("--group-size", type=int, default=1, help="near-duplicate group size for non-train splits")
    w.add_argument("--shard-size", type=int, default=1000)
    w.add_argument("--num-workers", type=int, default=1)
    w.set_defaults(fn=_cmd_world)

    i = sub.add_parser("inspect", help="show a shard directory's manifest and a few samples")
    i.add_argument("dir")
    i.add_argument("--split")
    i.add_argument("-n", type=int, default=3)
    i.set_defaults(fn=_cmd_inspect)
    plugged = _plugin_commands(sub)
    add_log_level(ap, [r, s, w, i, *plugged])
    return ap


def _plugin_commands(sub) -> list[argparse.ArgumentParser]:
    """Subcommands other packages add through the entry-point group ``d2s.commands``: each entry
    is a function ``add_parser(subparsers) -> parser`` that sets ``fn`` (``d2s ui``: d2s-ui).
    d2s never imports them by name, so the layering of docs/architecture.md holds."""
    from importlib.metadata import entry_points

    out = []
    for ep in sorted(entry_points(group="d2s.commands"), key=lambda e: e.name):
        try:
            add = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take `d2s run` down with it
            log.warning(
                "d2s %s: cannot load %s (%s: %s); the command is left out", ep.name, ep.value, type(exc).__name__, exc
            )
            continue
        out.append(add(sub))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may stand anywhere after `run PIPELINE`, options included.
        if args.cmd != "run" or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.cmd == "world" and not args.split:
        args.split = ["train=1000"]
    setup_logging(args.log_level)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
