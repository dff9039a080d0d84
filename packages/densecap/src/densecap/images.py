"""Image sources: where the images (and any human captions) come from.

An image source splits its input into *units* of work: one input shard, or one chunk of
a file list / dataset. Each unit becomes exactly one output shard (same split and index),
which is what makes runs resumable and splittable across ``--rank/--world-size``.
``iter_unit`` yields :class:`d2s.schema.Sample` objects, or :class:`Rejected` records for
images that cannot be read; :func:`check_image` then verifies that every image decodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from d2s.config import ConfigError
from d2s.registry import PluginRegistry
from d2s.schema import Sample, SampleError, sniff_image_ext

from .tables import missing, read_table, require_columns

log = logging.getLogger(__name__)

IMAGE_SOURCES: PluginRegistry[ImageSource] = PluginRegistry("image source", "densecap.image_sources")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Unit:
    """One piece of work: becomes the output shard ``<split>-<index>.tar``."""

    split: str
    index: int
    payload: Any  # source-specific: a tar path, a list of files, a row range...
    size: int | None = None  # number of images when known up front


@dataclass
class Rejected:
    """An image that could not be used, with the reason (written to the rejects jsonl)."""

    key: str
    id: str
    path: str
    reason: str


def make_key(text: str) -> str:
    """A WebDataset-safe key derived from an id: readable prefix + short hash (unique)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", text)[-60:].strip("_") or "img"
    return f"{stem}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def check_image(data: bytes | None) -> tuple[str | None, str]:
    """``(ext, "")`` for bytes that decode as an image, else ``(None, reason)``."""
    if not data:
        return None, "empty image bytes"
    ext = sniff_image_ext(data)
    if ext is None:
        return None, "not a JPEG/PNG/WebP file (unknown magic bytes)"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully: catches truncated files that verify() misses
            if im.width < 1 or im.height < 1:
                return None, "image has no pixels"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return None, f"cannot decode image: {type(exc).__name__}: {exc}"
    return ext, ""


def chunk(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class ImageSource:
    """Base class. Subclasses set ``Params`` and implement ``units`` and ``iter_unit``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, params: Any):
        self.params = params

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Rejected]:
        raise NotImplementedError

    def split_image_ext(self, split: str, units: list[Unit]) -> str:
        """The image extension a split's shards are written with under ``image_ext: auto``: here the
        format of the split's first readable image (units in order). Must give the same answer on
        every rank and rerun; sources that know their file names pick the most common suffix."""
        for unit in units:
            for item in self.iter_unit(unit):
                if isinstance(item, Sample):
                    ext, _ = check_image(item.image)
                    if ext is not None:
                        return ext
        return "jpg"


def _majority_ext(names: list[str]) -> str:
    """The most common image extension among file names (ties: jpg, png, webp)."""
    counts = {"jpg": 0, "png": 0, "webp": 0}
    for n in names:
        e = Path(n).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        if e in counts:
            counts[e] += 1
    return max(counts, key=lambda e: (counts[e], -list(counts).index(e)))


def _read_file(path: Path) -> bytes | Rejected:
    try:
        return path.read_bytes()
    except OSError as exc:
        return Rejected(make_key(str(path)), str(path), str(path), f"unreadable file: {exc}")


def _load_captions_table(path: Path, image_field: str, caption_field: str) -> dict[str, list[str]]:
    """image name -> captions, from a .jsonl / .json / .csv / .tsv / .parquet file (a caption cell
    may hold a list of captions); read by the reader the import caption source uses."""
    if not path.exists():
        raise FileNotFoundError(f"captions file {path} does not exist")
    df = read_table(path, "captions file", mapping=(image_field, caption_field))
    out: dict[str, list[str]] = {}
    if not len(df):
        return out
    require_columns(df, path, "captions file", [image_field, caption_field])
    for where, image, caps in zip(df.attrs["where"], df[image_field], df[caption_field]):
        if missing(image) or (not isinstance(caps, list) and missing(caps)):
            raise ConfigError(f"{where}: row lacks field {image_field!r} or {caption_field!r}")
        caps = list(caps) if isinstance(caps, (list, tuple, np.ndarray)) else [caps]  # ndarray: parquet lists
        out.setdefault(str(image), []).extend(str(c) for c in caps)
    return out


@IMAGE_SOURCES.register("folder")
class FolderSource(ImageSource):
    """A folder of images (searched recursively: .jpg .jpeg .png .webp), optionally with a captions
    file (jsonl/json/csv/tsv with an image-name field and a caption field) giving sparse captions.
    Ids are paths relative to the folder; units are chunks of the sorted file list."""

    @dataclass
    class Params:
        path: str
        captions: str = ""
        image_field: str = "image"
        caption_field: str = "caption"
        split: str = "train"
        dataset: str = ""
        chunk_size: int = 1000

    def __init__(self, params: FolderSource.Params):
        super().__init__(params)
        self.root = Path(params.path)
        if not self.root.is_dir():
            raise ConfigError(f"source folder: path {self.root} is not a directory")
        self.captions = (
            _load_captions_table(Path(params.captions), params.image_field, params.caption_field)
            if params.captions
            else {}
        )

    def units(self) -> list[Unit]:
        files = sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        return [Unit(self.params.split, i, c, len(c)) for i, c in enumerate(chunk(files, self.params.chunk_size))]

    def split_image_ext(self, split: str, units: list[Unit]) -> str:
        return _majority_ext([rel for u in units for rel in u.payload])

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Rejected]:
        for rel in unit.payload:
            data = _read_file(self.root / rel)
            if isinstance(data, Rejected):
                yield data
                continue
            sparse = self.captions.get(rel) or self.captions.get(Path(rel).name) or []
            yield Sample(
                key=make_key(rel),
                image=data,
                image_ext=Path(rel).suffix.lstrip(".").lower().replace("jpeg", "jpg"),
                id=rel,
                dataset=self.params.dataset or self.root.name,
                split=unit.split,
                path=rel,
                sparse=list(sparse),
            )


@IMAGE_SOURCES.register("karpathy")
class KarpathySource(ImageSource):
    """A COCO / Flickr30K Karpathy split file (dataset_coco.json style: images[] with filepath,
    filename, split, sentences[].raw, cocoid/imgid) plus the image root. The sentences become
    sparse captions; 'restval' can be folded into 'train' (the usual 113k COCO train set)."""

    @dataclass
    class Params:
        path: str
        image_root: str
        splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
        restval_as_train: bool = True
        chunk_size: int = 1000

    def __init__(self, params: KarpathySource.Params):
        super().__init__(params)
        p = Path(params.path)
        if not p.exists():
            raise FileNotFoundError(f"source karpathy: split file {p} does not exist")
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"source karpathy: {p} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise ConfigError(f"source karpathy: {p} has no 'images' list (is it a Karpathy split file?)")
        self.dataset = str(doc.get("dataset", p.stem))
        self.root = Path(params.image_root)
        self.by_split: dict[str, list[dict]] = {}
        for n, img in enumerate(doc["images"]):
            if "filename" not in img or "split" not in img:
                raise ConfigError(f"source karpathy: {p} images[{n}] lacks 'filename' or 'split'")
            split = img["split"]
            if split == "restval" and params.restval_as_train:
                split = "train"
            if split in params.splits:
                self.by_split.setdefault(split, []).append(img)

    def units(self) -> list[Unit]:
        units = []
        for split in self.params.splits:
            for i, c in enumerate(chunk(self.by_split.get(split, []), self.params.chunk_size)):
                units.append(Unit(split, i, c, len(c)))
        return units

    def split_image_ext(self, split: str, units: list[Unit]) -> str:
        return _majority_ext([img["filename"] for u in units for img in u.payload])

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Rejected]:
        for img in unit.payload:
            rel = str(Path(img.get("filepath", "")) / img["filename"])
            image_id = str(img.get("cocoid", img.get("imgid", rel)))
            data = _read_file(self.root / rel)
            if isinstance(data, Rejected):
                yield Rejected(make_key(image_id), image_id, rel, data.reason)
                continue
            yield Sample(
                key=make_key(image_id),
                image=data,
                image_ext=Path(rel).suffix.lstrip(".").lower().replace("jpeg", "jpg"),
                id=image_id,
                dataset=self.dataset,
                split=unit.split,
                path=rel,
                sparse=[s.get("raw", "").strip() for s in img.get("sentences", []) if s.get("raw")],
            )


def _tar_paths(path: str, split: str | None = None) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"shards path {p} does not exist")
    manifest = p / "manifest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        names = [n for s, e in sorted(doc["splits"].items()) if split in (None, "", s) for n in e["shards"]]
        return [p / n for n in names]
    return sorted(q for q in p.glob("*.tar"))


_PROJECT_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")


@IMAGE_SOURCES.register("shards")
class ShardsSource(ImageSource):
    """WebDataset shards: this project's own (key.json with schema_version + image; the synthetic
    world is one of these) or img2dataset output (key.jpg/.png/.webp + optional key.txt caption and
    key.json metadata). 'path' is a shard directory (manifest.json used when present) or one .tar.
    Each input shard is one unit; project shards keep their split and index."""

    @dataclass
    class Params:
        path: str
        split: str = ""  # project shards: only this split ('' = all); img2dataset: the split to assign
        dataset: str = ""

    def units(self) -> list[Unit]:
        units = []
        for i, tar in enumerate(_tar_paths(self.params.path, self.params.split or None)):
            m = _PROJECT_SHARD.match(tar.name)
            if m:
                units.append(Unit(m["split"], int(m["index"]), str(tar)))
            else:
                units.append(Unit(self.params.split or "train", i, str(tar)))
        return units

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Rejected]:
        import webdataset as wds

        ds = wds.WebDataset([unit.payload], shardshuffle=False, empty_check=False)
        for rec in ds:
            key = rec["__key__"]
            doc = None
            if "json" in rec:
                try:
                    doc = json.loads(rec["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield Rejected(
                        make_key(f"{unit.payload}/{key}"), key, unit.payload, f"malformed json member: {exc}"
                    )
                    continue
            if isinstance(doc, dict) and "schema_version" in doc:
                try:
                    yield Sample.from_wds(rec, shard=unit.payload)
                except SampleError as exc:
                    yield Rejected(key, str(doc.get("id", key)), unit.payload, str(exc))
                continue
            # img2dataset layout
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in rec), None)
            meta = doc if isinstance(doc, dict) else {}
            image_id = str(meta.get("key") or key)
            if ext is None:
                yield Rejected(make_key(image_id), image_id, unit.payload, "no image member (.jpg/.png/.webp)")
                continue
            caption = rec.get("txt", b"").decode("utf-8", "replace").strip() or str(meta.get("caption") or "")
            yield Sample(
                key=make_key(image_id),
                image=rec[ext],
                image_ext=ext.replace("jpeg", "jpg"),
                id=image_id,
                dataset=self.params.dataset or Path(unit.payload).parent.name,
                split=unit.split,
                path=str(meta.get("url") or ""),
                sparse=[caption] if caption else [],
                meta={
                    k: str(v)
                    for k, v in meta.items()
                    if isinstance(v, (str, int, float)) and k in ("url", "width", "height", "sha256")
                },
            )


IMAGE_SOURCES.register("synthetic-world")(
    type(
        "SyntheticWorldSource",
        (ShardsSource,),
        {
            "__doc__": "The project's synthetic world (d2s.synthetic / the synthetic-world stage): its shards in the "
            "project format, read like 'shards'. Pair it with the synthetic-oracle caption source.",
        },
    )
)


@IMAGE_SOURCES.register("hf")
class HFDatasetSource(ImageSource):
    """A Hugging Face `datasets` dataset: a local directory written by save_to_disk (load_from_disk),
    or anything load_dataset accepts (a hub name for users with internet, a local script/data dir).
    The image column may hold PIL images, {'bytes','path'} dicts or raw bytes; units are row ranges."""

    @dataclass
    class Params:
        path: str
        split: str = "train"
        image_column: str = "image"
        caption_column: str = ""
        id_column: str = ""
        name: str = ""  # load_dataset config name
        chunk_size: int = 1000

    def __init__(self, params: HFDatasetSource.Params):
        super().__init__(params)
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            import datasets

            p = Path(self.params.path)
            if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(self.params.path, self.params.name or None)
            if isinstance(ds, datasets.DatasetDict):
                if self.params.split not in ds:
                    raise ConfigError(
                        f"source hf: {self.params.path} has no split {self.params.split!r}; splits: {list(ds)}"
                    )
                ds = ds[self.params.split]
            if self.params.image_column not in ds.column_names:
                raise ConfigError(f"source hf: no column {self.params.image_column!r}; columns: {ds.column_names}")
            # raw bytes, not decoded PIL images: we store the original encoding
            feat = ds.features[self.params.image_column]
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(self.params.image_column, datasets.Image(decode=False))
            self._ds = ds
        return self._ds

    def units(self) -> list[Unit]:
        n = len(self.ds)
        cs = self.params.chunk_size
        return [
            Unit(self.params.split, i, (s, min(n, s + cs)), min(n, s + cs) - s) for i, s in enumerate(range(0, n, cs))
        ]

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Rejected]:
        start, stop = unit.payload
        p = self.params
        for row_i in range(start, stop):
            row = self.ds[row_i]
            image_id = str(row[p.id_column]) if p.id_column else f"{p.split}/{row_i}"
            img = row[p.image_column]
            path = ""
            if isinstance(img, dict):
                path = img.get("path") or ""
                data = img.get("bytes")
                if data is None and path:
                    got = _read_file(Path(path))
                    if isinstance(got, Rejected):
                        yield Rejected(make_key(image_id), image_id, path, got.reason)
                        continue
                    data = got
            elif isinstance(img, (bytes, bytearray)):
                data = bytes(img)
            elif img is not None and hasattr(img, "save"):
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data = buf.getvalue()
            else:
                data = None
            if not data:
                yield Rejected(
                    make_key(image_id), image_id, path, f"row {row_i}: no image in column {p.image_column!r}"
                )
                continue
            caps = row.get(p.caption_column) if p.caption_column else None
            caps = [] if caps is None else (caps if isinstance(caps, list) else [caps])
            yield Sample(
                key=make_key(image_id),
                image=data,
                image_ext=sniff_image_ext(data) or "jpg",
                id=image_id,
                dataset=Path(p.path).name,
                split=unit.split,
                path=path,
                sparse=[str(c) for c in caps],
            )
