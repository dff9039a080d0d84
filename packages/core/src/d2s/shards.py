"""Writing and reading sample shards.

Layout of a dataset directory::

    <split>-000000.tar          samples (see d2s.schema)
    <split>-000000.stats.json   written last: the shard's completion marker
    sizes.json                  {shard file name: sample count} (open_clip's convention)
    manifest.json               per split: shard names and total count

A shard is complete exactly when its stats file exists and names the tar's size.
Writers write ``<name>.tar.tmp``, fsync, rename it to ``<name>.tar``, then write the
stats file (itself through a temporary name). A crash at any point leaves either
nothing, a ``.tmp`` file, or a tar without stats: none of them looks complete, and
:func:`remove_incomplete` clears them before a resumed run rewrites the shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .schema import SCHEMA_VERSION, Sample, SampleError, convert_image, normalise_ext

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")


def shard_name(split: str, index: int) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split names may use letters, digits and '_' only, got {split!r}")
    return f"{split}-{index:06d}.tar"


def stats_path(tar_path: str | os.PathLike) -> Path:
    p = Path(tar_path)
    return p.with_name(p.name[: -len(".tar")] + ".stats.json")


class ShardWriter:
    """Writes one shard atomically. Use as a context manager::

    with ShardWriter(out_dir, "train", 3) as w:
        for s in samples:
            w.write(s)
        w.stats["dropped_unreadable"] = 2   # anything JSON-serialisable
    # on normal exit: tar renamed into place, then stats written (the marker)
    # on exception: the temporary file is removed, nothing looks complete
    """

    def __init__(self, directory: str | os.PathLike, split: str, index: int, *, image_ext: str | None = None):
        """``image_ext``: if set, images in another format are re-encoded to it (and
        ``meta["original_format"]`` records theirs). Readers built on Arrow (``datasets``)
        need one image extension across a split; images already in that format are
        stored byte for byte."""
        self.image_ext = normalise_ext(image_ext) if image_ext else None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.index = index
        self.path = self.directory / shard_name(split, index)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.stats: dict[str, Any] = {}
        self.count = 0
        self.sparse_count = 0
        self._keys: set[str] = set()
        self._t0 = time.time()
        self._fileobj = open(self.tmp_path, "wb")
        # Imported lazily so that `import d2s` stays light.
        import webdataset as wds

        # Whole-second mtimes fit the ustar header; a float one makes tarfile add a PAX
        # header to every member, which doubles the headers a reader parses.
        self._tar = wds.TarWriter(self._fileobj, mtime=int(self._t0))

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise SampleError("duplicate key within one shard", shard=self.path.name, key=sample.key)
        self._keys.add(sample.key)
        if self.image_ext and normalise_ext(sample.image_ext, key=sample.key) != self.image_ext:
            sample = dataclasses.replace(
                sample,
                image=convert_image(sample.image, self.image_ext),
                image_ext=self.image_ext,
                meta={**sample.meta, "original_format": sample.image_ext},
            )
        self._tar.write(sample.to_wds())
        self.count += 1
        self.sparse_count += len(sample.sparse)

    def close(self) -> dict[str, Any]:
        self._tar.close()  # also closes the file object
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        stats = {
            "schema_version": SCHEMA_VERSION,
            "shard": self.path.name,
            "split": self.split,
            "index": self.index,
            "count": self.count,
            "sparse_count": self.sparse_count,
            "bytes": self.path.stat().st_size,
            "seconds": round(time.time() - self._t0, 3),
            **self.stats,
        }
        atomic_write_json(stats_path(self.path), stats)
        return stats

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            pass
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def completed_shards(directory: str | os.PathLike, split: str | None = None) -> dict[str, dict]:
    """``{tar path: stats}`` of the complete shards in ``directory`` (optionally one split)."""
    directory = Path(directory)
    out: dict[str, dict] = {}
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        m = _SHARD_RE.match(p.name)
        if not m or (split is not None and m["split"] != split):
            continue
        sp = stats_path(p)
        if not sp.exists():
            continue
        try:
            stats = json.loads(sp.read_text())
        except json.JSONDecodeError:
            continue
        if stats.get("bytes") != p.stat().st_size:
            continue
        out[str(p)] = stats
    return out


def remove_incomplete(directory: str | os.PathLike) -> list[str]:
    """Delete leftovers of interrupted writes; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    complete = set(completed_shards(directory))
    removed = []
    for p in directory.iterdir():
        stale = p.name.endswith(".tmp") or (_SHARD_RE.match(p.name) and str(p) not in complete)
        if stale:
            p.unlink()
            sp = stats_path(p) if p.suffix == ".tar" else None
            if sp is not None:
                sp.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d incomplete file(s) in %s: %s", len(removed), directory, ", ".join(sorted(removed)))
    return removed


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Write ``sizes.json`` and ``manifest.json`` from the complete shards' stats."""
    directory = Path(directory)
    shards = completed_shards(directory)
    sizes = {Path(p).name: s["count"] for p, s in shards.items()}
    splits: dict[str, dict] = {}
    for p, s in shards.items():
        entry = splits.setdefault(s["split"], {"shards": [], "count": 0, "sparse_count": 0})
        entry["shards"].append(Path(p).name)
        entry["count"] += s["count"]
        if entry["sparse_count"] is not None and "sparse_count" in s:
            entry["sparse_count"] += s["sparse_count"]
        else:  # a shard written before sparse counts were recorded
            entry["sparse_count"] = None
    manifest = {"schema_version": SCHEMA_VERSION, "splits": splits}
    atomic_write_json(directory / "sizes.json", sizes)
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a dataset written by this project?")
    return json.loads(path.read_text())


def split_shards(directory: str | os.PathLike, split: str) -> list[str]:
    """Paths of the split's shards, from the manifest; an error names what is missing."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise KeyError(f"{directory}: no split {split!r}; splits present: {sorted(manifest['splits'])}")
    return [str(Path(directory) / n) for n in manifest["splits"][split]["shards"]]


def split_size(directory: str | os.PathLike, split: str) -> int:
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise KeyError(f"{directory}: no split {split!r}; splits present: {sorted(manifest['splits'])}")
    return int(manifest["splits"][split]["count"])


def split_sparse_count(directory: str | os.PathLike, split: str) -> int:
    """Number of sparse captions in a split (what an epoch over captions iterates).

    From the manifest; for shards written before their stats recorded it, counted by reading
    the split's JSON members once."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise KeyError(f"{directory}: no split {split!r}; splits present: {sorted(manifest['splits'])}")
    n = manifest["splits"][split].get("sparse_count")
    if n is not None:
        return int(n)
    log.info("%s: manifest has no sparse-caption count for split %r; counting them", directory, split)
    return sum(len(s.sparse) for s in iter_samples(split_shards(directory, split)))


def iter_records(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Raw webdataset records (``__key__``, ``__url__``, member bytes) of the shards, in order."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    if not urls:
        return iter(())
    for p in urls:
        if not Path(p).exists():
            raise FileNotFoundError(f"shard {p} does not exist")
    # Every shard, in order, in this process: no node or worker splitting (this is a plain
    # reader, also used while torch.distributed is up, where webdataset would otherwise
    # insist on an explicit node splitter).
    return iter(
        wds.WebDataset(
            urls, shardshuffle=False, empty_check=False, nodesplitter=_every_shard, workersplitter=_every_shard
        )
    )


def _every_shard(src):
    return src


def iter_samples(paths: Iterable[str | os.PathLike]) -> Iterator[Sample]:
    """Parsed samples of the shards, in order. A bad sample raises SampleError naming it."""
    for rec in iter_records(paths):
        yield Sample.from_wds(rec)


def read_samples(directory: str | os.PathLike, split: str) -> list[Sample]:
    return list(iter_samples(split_shards(directory, split)))
