"""What the page shows, found once at start-up: shard directories, bundles, bench results and
densecap reports, either under a run directory (``d2s ui RUN_DIR``) or named one by one.

The roots are every directory given or found here; the app reads files under them only
(:func:`Roots.resolve`), and writes nowhere under them: its one writable place is the
embedding cache (``cache_dir``, outside every root).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from d2s.config import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class UIError(Exception):
    """A request the app refuses or cannot answer; ``status`` is the HTTP status, the message is
    shown on the page as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Named:
    name: str
    path: Path


@dataclass
class UIConfig:
    """Everything ``d2s ui`` was given, paths resolved; ``check`` names a bad field."""

    run_dir: Path | None = None
    shards: list[Named] = field(default_factory=list)
    images: list[Named] = field(default_factory=list)  # folders of image files (search only)
    bundles: list[Named] = field(default_factory=list)
    results: list[Named] = field(default_factory=list)
    reports: list[Named] = field(default_factory=list)
    hf_models: list[Named] = field(default_factory=list)  # name -> hub name or local folder
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    engine: str = "auto"  # auto | exact | faiss
    # engine auto: FAISS from this many images on. At 100k images x 1,024 dims an exact query
    # costs 40-60 ms on 2 cores and a flat FAISS index is only ~1.7x faster, after a build of
    # 0.2-3 s on the first query (benchmarks/ui_query.py): exact answers first faster there.
    faiss_min_images: int = 1_000_000

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "exact", "faiss"):
            raise ConfigError(f"engine: expected auto, exact or faiss, got {self.engine!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        for kind in ("shards", "images", "bundles", "results", "reports", "hf_models"):
            names = [n.name for n in getattr(self, kind)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{kind}: name(s) {dup} given twice; name them NAME=PATH")
        for kind in ("shards", "images", "bundles", "results", "reports"):
            for n in getattr(self, kind):
                if not n.path.exists():
                    raise ConfigError(f"{kind}: {n.name}: {n.path} does not exist")
        for root in self.roots():
            if _is_under(self.cache_dir, root.path):
                raise ConfigError(
                    f"cache_dir: {self.cache_dir} is inside {root.path}; the app never writes under what it shows"
                )

    def roots(self) -> list[Named]:
        """Every directory the app may read under, by name (a results file stands for its folder)."""
        out: list[Named] = []
        if self.run_dir is not None:
            out.append(Named("run", self.run_dir))
        for kind in ("shards", "images", "bundles", "results", "reports"):
            for n in getattr(self, kind):
                out.append(Named(f"{kind}:{n.name}", n.path if n.path.is_dir() else n.path.parent))
        return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "d2s-ui"


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def parse_named(items: list[str], kind: str) -> list[Named]:
    """``NAME=PATH`` or a bare ``PATH`` (named by its last two path parts)."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = _short_name(Path(item)), item
        if not name or not path:
            raise ConfigError(f"--{kind} {item!r}: expected NAME=PATH or PATH")
        out.append(Named(name, Path(path).expanduser().resolve()))
    return out


def _short_name(p: Path) -> str:
    p = p.resolve()
    return "/".join(p.parts[-2:]) if p.name in ("bundle", "shards", "results", "report") else p.name


# ---------------------------------------------------------------------------- discovery
MAX_DEPTH = 4


def _walk(root: Path, depth: int = 0):
    """Directories under ``root`` to ``MAX_DEPTH`` levels, skipping hidden ones and the
    trainer's state folders (many, and never of interest here)."""
    yield root
    if depth >= MAX_DEPTH:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for c in children:
        if c.name.startswith(".") or c.name in ("state", "tensorboard", "rejects", "last", "best"):
            continue
        yield from _walk(c, depth + 1)


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def discover(run_dir: Path) -> dict[str, list[Named]]:
    """Shards (``manifest.json``), bundles (``vse_config.json`` of format ``vse-bundle``), bench
    results (``results.json`` of format ``d2s-bench-retrieval``) and densecap reports
    (``summary.json`` beside ``lengths.png``) under ``run_dir``, named by their path in it."""
    run_dir = run_dir.resolve()
    found: dict[str, list[Named]] = {"shards": [], "bundles": [], "results": [], "reports": []}
    bundle_configs: dict[str, bytes] = {}

    def add(kind: str, name: str, d: Path, rel: str) -> None:
        names = {n.name for n in found[kind]}
        if name in names:  # e.g. two stages' folders of the same last name: the whole path
            name = rel
        if name not in names:
            found[kind].append(Named(name, d))

    for d in _walk(run_dir):
        rel = d.relative_to(run_dir).as_posix()
        name = rel if rel != "." else run_dir.name
        if (d / "manifest.json").is_file():
            add("shards", name.removesuffix("/shards"), d, rel)
        doc = _read_json(d / "vse_config.json") if (d / "vse_config.json").is_file() else None
        if doc is not None and doc.get("format") == "vse-bundle":
            config = (d / "vse_config.json").read_bytes()
            bname = _bundle_name(rel)
            # a vse-train stage copies <stage>/run/bundle to <stage>/bundle: the copy is one model
            if bundle_configs.get(bname) != config:
                add("bundles", bname, d, rel)
                bundle_configs.setdefault(bname, config)
        doc = _read_json(d / "results.json") if (d / "results.json").is_file() else None
        if doc is not None and doc.get("format") == "d2s-bench-retrieval":
            add("results", name.removesuffix("/results"), d, rel)
        if (d / "summary.json").is_file() and (d / "lengths.png").is_file():
            add("reports", name.removesuffix("/report"), d, rel)
    return found


def _bundle_name(rel: str) -> str:
    """``d2s/bundle`` -> ``d2s``; ``d2s/run/bundle-raw`` -> ``d2s raw``."""
    parts = [p for p in rel.split("/") if p not in ("run", ".")]
    last = parts[-1] if parts else rel
    if last == "bundle" and len(parts) > 1:
        return "/".join(parts[:-1])
    if last.startswith("bundle-") and len(parts) > 1:
        return "/".join(parts[:-1]) + " " + last.removeprefix("bundle-")
    return "/".join(parts) or rel


def build_config(
    run_dir: str | Path | None = None,
    *,
    shards: list[str] = (),
    images: list[str] = (),
    bundles: list[str] = (),
    results: list[str] = (),
    reports: list[str] = (),
    hf_models: list[str] = (),
    cache_dir: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    engine: str = "auto",
) -> UIConfig:
    """The config from what the command line gave: a run directory's findings plus the paths
    named explicitly (an explicit one replaces a found one of the same name)."""
    found: dict[str, list[Named]] = {"shards": [], "bundles": [], "results": [], "reports": []}
    rd = None
    if run_dir is not None:
        rd = Path(run_dir).expanduser().resolve()
        if not rd.is_dir():
            raise ConfigError(f"RUN_DIR: {run_dir} is not a directory")
        found = discover(rd)
    given = {
        "shards": parse_named(list(shards), "shards"),
        "bundles": parse_named(list(bundles), "bundle"),
        "results": parse_named(list(results), "results"),
        "reports": parse_named(list(reports), "report"),
    }
    merged = {}
    for kind, items in found.items():
        names = {n.name for n in given[kind]}
        merged[kind] = [n for n in items if n.name not in names] + given[kind]
    hf = []
    for item in hf_models:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ConfigError(f"--hf {item!r}: expected NAME=MODEL (a hub name or a local folder)")
        hf.append(Named(name, Path(model)))
    folders = parse_named(list(images), "images")
    if not any(merged.values()) and not folders:
        raise ConfigError("nothing to show: give a RUN_DIR, or --shards / --images / --bundle / --results")
    return UIConfig(
        run_dir=rd,
        images=folders,
        hf_models=hf,
        cache_dir=Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(),
        host=host,
        port=port,
        engine=engine,
        **merged,
    )
