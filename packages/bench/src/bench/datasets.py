"""Loaders for the published long-caption retrieval sets, reading the files as their publishers distribute them.

Each loader takes the directory where the publisher's files were unpacked and returns an
:class:`~bench.data.EvalSet` with one long text per image, in the order the protocol
defines (``d2s.retrieval.PROTOCOLS[name]`` states subset, text rule and published table).
A root may also be ``hf://<owner>/<dataset>``: the hub snapshot is downloaded (and
zip archives in it unpacked) into the Hugging Face cache first; that path needs internet.

Every loader checks its files before anything is embedded: a missing or truncated
annotation file fails naming the file (and the line for JSON Lines), a missing field names
the entry and the field, and a missing image names the image file and how many are
missing. Sources, licences and exact layouts: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2s.registry import Registry

from .data import DatasetError, EvalSet
from .manifest import files_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """A published evaluation set: its protocol, its loader and the directories the loader reads."""

    name: str
    protocol: str
    loader: Callable[..., EvalSet]
    roots: tuple[str, ...] = ("root",)  # keyword arguments of the loader naming directories
    hub: dict[str, str] = field(default_factory=dict)  # root name -> hub dataset id, for users with internet
    licence: str = ""


BENCHMARKS: Registry[Benchmark] = Registry(
    "benchmark", "d2s.benchmarks", base=Benchmark, error=DatasetError, name_attr=None, items="instance"
)
"""Published long-caption sets by name (``bench retrieval --benchmark NAME --data-root DIR``)."""


# ------------------------------------------------------------------------------- helpers
def lotlip_text(text: str) -> str:
    """LoTLIP's normalisation: split at newlines, ``</s>`` and full stops, strip, drop empty parts, join with '. '."""
    return ". ".join(p.strip() for p in re.split(r"\n|</s>|[.]", text) if p.strip())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (expected {what})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON, truncated or damaged? ({exc}); expected {what}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); expected {what}") from None


def _read_jsonl(path: Path, what: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (expected {what})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); expected {what}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not a JSON object, truncated line? ({exc}); expected {what}") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}:{n}: expected a JSON object per line ({what}), got {type(rec).__name__}")
        out.append(rec)
    if not out:
        raise DatasetError(f"{path}: empty (expected {what})")
    return out


def _field(rec: Any, key: str, where: str, kind: type = str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise DatasetError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind) or (kind is str and not v.strip()):
        raise DatasetError(f"{where}: field {key!r} must be a non-empty {kind.__name__}, got {v!r:.60}")
    return v


def _check_images(paths: list[str], name: str, hint: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{name}: image file {missing[0]} not found ({len(missing)} of {len(paths)} missing); {hint}"
        )


def _check_count(name: str, got: int, want: int | None, what: str) -> None:
    if want is not None and got != want:
        raise DatasetError(f"{name}: found {got} {what}, the protocol needs {want}")


def _evalset(name: str, ids: list[str], images: list[str], texts: list[str], prov: dict) -> EvalSet:
    return EvalSet(name, ids, images, texts, np.arange(len(texts), dtype=np.int64), provenance=prov)


def resolve_root(spec: str | Path) -> Path:
    """A local directory, or ``hf://owner/name``: the dataset snapshot from the Hugging Face hub
    (needs internet), with any .zip in it unpacked beside it once."""
    s = str(spec)
    if not s.startswith("hf://"):
        p = Path(s)
        if not p.is_dir():
            raise DatasetError(f"{p}: no such directory")
        return p
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id=s.removeprefix("hf://"), repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: one clear error naming the root
        raise DatasetError(
            f"{s}: cannot fetch the hub dataset ({type(exc).__name__}: {exc}); give a local directory instead"
        ) from None
    for z in local.rglob("*.zip"):
        out = z.with_suffix("")
        if not out.exists():
            with zipfile.ZipFile(z) as zf:
                zf.extractall(out.with_name(out.name + ".tmp"))
            out.with_name(out.name + ".tmp").rename(out)
    return local


def _find_dir(root: Path, *candidates: str) -> Path:
    """The first of ``root/c`` that exists (publishers' archives differ in one folder level)."""
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DatasetError(f"{root}: none of {list(candidates)} found (is the dataset unpacked here?)")


# ------------------------------------------------------------------------------- Urban1k
def load_urban1k(root: str | Path, count: int | None = 1000) -> EvalSet:
    """Urban1k as on the hub (``BeichenZhang/Urban1k``): ``Urban1k/image/<n>.jpg`` and
    ``Urban1k/caption/<n>.txt``; the text is the caption file's first line (Long-CLIP)."""
    base = _find_dir(resolve_root(root), "Urban1k", "Urban1k/Urban1k", "Urban-1k", "Urban-1k/Urban1k", ".")
    cap_dir, img_dir = base / "caption", base / "image"
    if not cap_dir.is_dir():
        raise DatasetError(f"{cap_dir}: no such directory (expected Urban1k caption/*.txt files)")
    files = sorted(cap_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
    _check_count(f"{cap_dir}", len(files), count, "caption files")
    if not files:
        raise DatasetError(f"{cap_dir}: no caption .txt files")
    ids, images, texts = [], [], []
    for f in files:
        lines = f.read_text(encoding="utf-8", errors="strict").splitlines()
        if not lines or not lines[0].strip():
            raise DatasetError(f"{f}: empty caption file (expected the long caption on its first line)")
        ids.append(f.stem)
        images.append(str(img_dir / f"{f.stem}.jpg"))
        texts.append(lines[0].strip())
    _check_images(images, "urban1k", f"expected one {img_dir}/<n>.jpg per caption file")
    prov = {"source": str(base), "files": files_sha256(files, base)}
    return _evalset("urban1k", ids, images, texts, prov)


# ------------------------------------------------------------------------------- DOCCI
def load_docci(root: str | Path, split: str = "test", count: int | None = 5000) -> EvalSet:
    """DOCCI as Google distributes it: ``docci_descriptions.jsonlines`` (``example_id``,
    ``split``, ``image_file``, ``description``) and ``images/`` from ``docci_images.tar.gz``."""
    base = resolve_root(root)
    ann = base / "docci_descriptions.jsonlines"
    recs = _read_jsonl(ann, "DOCCI descriptions, one JSON object per line")
    ids, images, texts, splits = [], [], [], set()
    for n, rec in enumerate(recs, 1):
        where = f"{ann}:{n}"
        s = _field(rec, "split", where)
        splits.add(s)
        if s != split:
            continue
        image_file = _field(rec, "image_file", where)
        ids.append(str(rec.get("example_id", Path(image_file).stem)))
        images.append(str(base / "images" / image_file))
        texts.append(_field(rec, "description", where).strip())
    if not ids:
        raise DatasetError(f"{ann}: no entries with split {split!r}; splits present: {sorted(splits)}")
    _check_count(f"{ann} split {split!r}", len(ids), count, "entries")
    _check_images(images, "docci", f"expected {base}/images/ from docci_images.tar.gz")
    prov = {"source": str(base), "files": files_sha256([ann], base), "split": split}
    return _evalset(f"docci:{split}", ids, images, texts, prov)


# ------------------------------------------------------------------------------- DCI / sDCI
def _dci_base(root: Path) -> Path:
    return _find_dir(root, "densely_captioned_images", ".") if not (root / "splits.json").is_file() else root


def _dci_entries(base: Path, count: int | None) -> list[str]:
    splits = _read_json(base / "splits.json", "DCI splits: {split: [annotation file names]}")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DatasetError(f"{base / 'splits.json'}: expected an object of lists of annotation file names")
    names = [str(x) for v in splits.values() for x in v]
    _check_count(f"{base / 'splits.json'}", len(names), count, "annotations")
    return names


def load_dci(root: str | Path, count: int | None = 7805) -> EvalSet:
    """DCI from ``dci.tar.gz``: ``densely_captioned_images/splits.json``, ``annotations/<name>``
    (``image``, ``short_caption``, ``extra_caption``) and ``photos/`` (SA-1B sa_000138.tar)."""
    base = _dci_base(resolve_root(root))
    ids, images, texts, files = [], [], [], []
    for name in _dci_entries(base, count):
        f = base / "annotations" / name
        doc = _read_json(f, "a DCI annotation with image, short_caption and extra_caption")
        where = str(f)
        img = _field(doc, "image", where)
        short = _field(doc, "short_caption", where)
        extra = doc.get("extra_caption", "")
        if not isinstance(extra, str):
            raise DatasetError(f"{where}: field 'extra_caption' must be a string")
        ids.append(name)
        images.append(str(base / "photos" / img))
        texts.append(lotlip_text(f"{short}\n{extra}"))
        files.append(f)
    _check_images(images, "dci", f"expected {base}/photos/ (SA-1B archive sa_000138.tar)")
    prov = {"source": str(base), "files": files_sha256([base / "splits.json", *files], base)}
    return _evalset("dci", ids, images, texts, prov)


def load_sdci(root: str | Path, count: int | None = 7805) -> EvalSet:
    """sDCI: the DCI images with the first LLM summary, ``complete/<name>`` ``summaries.base[0]``."""
    base = _dci_base(resolve_root(root))
    ids, images, texts, files = [], [], [], []
    for name in _dci_entries(base, count):
        f = base / "complete" / name
        doc = _read_json(f, "a DCI complete entry with image and summaries.base")
        where = str(f)
        img = _field(doc, "image", where)
        base_sums = _field(_field(doc, "summaries", where, dict), "base", f"{where}: summaries", list)
        if not base_sums or not isinstance(base_sums[0], str) or not base_sums[0].strip():
            raise DatasetError(f"{where}: summaries.base must hold at least one non-empty summary")
        ids.append(name)
        images.append(str(base / "photos" / img))
        texts.append(base_sums[0].strip())
        files.append(f)
    _check_images(images, "sdci", f"expected {base}/photos/ (SA-1B archive sa_000138.tar)")
    prov = {"source": str(base), "files": files_sha256([base / "splits.json", *files], base)}
    return _evalset("sdci", ids, images, texts, prov)


# ------------------------------------------------------------------------------- IIW
IIW_PARTS = (  # (folder in google/imageinwords datasets/, image key field, image folder, LoTLIP order)
    ("DOCCI_Test", "image", "docci"),
    ("IIW-400", "image/key", "docci_aar"),
    ("DCI_Test", "image", "dci"),
)


def load_iiw(root: str | Path, docci_root: str | Path, dci_root: str | Path, count: int | None = 612) -> EvalSet:
    """IIW's human descriptions: ``<root>/{DOCCI_Test,IIW-400,DCI_Test}/data.jsonl`` (the
    imageinwords repository's ``datasets/``; the upper-case ``DOCCI_TEST``/``DCI_TEST``
    spelling is accepted too), text field ``IIW``. Images: DOCCI_Test from
    ``<docci_root>/images/``, IIW-400 from ``<docci_root>/images_aar/`` (DOCCI's AAR images),
    DCI_Test from ``<dci_root>/densely_captioned_images/photos/``."""
    base = resolve_root(root)
    docci, dci = resolve_root(docci_root), _dci_base(resolve_root(dci_root))
    image_dirs = {"docci": docci / "images", "docci_aar": docci / "images_aar", "dci": dci / "photos"}
    ids, images, texts, files = [], [], [], []
    for part, key, img_dir in IIW_PARTS:
        d = _find_dir(base, part, part.upper())
        f = d / "data.jsonl"
        files.append(f)
        for n, rec in enumerate(_read_jsonl(f, f"IIW {part} records with {key!r} and 'IIW'"), 1):
            where = f"{f}:{n}"
            name = _field(rec, key, where)
            name = name if name.endswith(".jpg") else f"{name}.jpg"
            ids.append(f"{part}/{name}")
            images.append(str(image_dirs[img_dir] / name))
            texts.append(lotlip_text(_field(rec, "IIW", where)))
    _check_count(f"{base} (IIW parts)", len(ids), count, "records")
    _check_images(images, "iiw", "DOCCI images/ and images_aar/ from docci_images*.tar.gz, DCI photos/")
    prov = {"source": str(base), "files": files_sha256(files, base)}
    return _evalset("iiw", ids, images, texts, prov)


# ------------------------------------------------------------------------------- ShareGPT4V
SHARE4V_FILE = "share-captioner_coco_lcs_sam_1246k_1107.json"


def _image_index(root: Path) -> dict[str, Path]:
    log.info("indexing images under %s", root)
    return {p.name: p for p in root.rglob("*.jpg")}


def load_sharegpt4v(
    root: str | Path, count: int, annotations: str | Path | None = None, cut: str = "lotlip"
) -> EvalSet:
    """ShareGPT4V-1k / 10k from the ShareCaptioner file, text ``conversations[1].value``.

    ``cut="lotlip"``: the first ``count`` entries whose image is an SA-1B image (``sa_*.jpg``),
    in file order, text under LoTLIP's rule. ``cut="longclip"``: the first ``count`` entries of
    the file whatever their image source, newlines replaced by spaces (Long-CLIP's
    ``share4v_val_dataset``; FG-CLIP's evaluation reads the same entries). Images at
    ``<root>/<image>`` (ShareGPT4V's ``sam/images/``, ``coco/train2017/`` layout) or anywhere
    under ``root`` by file name (e.g. SA-1B's ``sa_000000/images/``)."""
    if cut not in ("lotlip", "longclip"):
        raise DatasetError(f"cut: expected 'lotlip' or 'longclip', got {cut!r}")
    base = resolve_root(root)
    ann = Path(annotations) if annotations is not None else base / SHARE4V_FILE
    doc = _read_json(ann, "the ShareCaptioner list of {image, conversations}")
    if not isinstance(doc, list):
        raise DatasetError(f"{ann}: expected a JSON list of {{'image', 'conversations'}} entries")
    ids, images, texts = [], [], []
    index: dict[str, Path] | None = None
    for n, rec in enumerate(doc):
        where = f"{ann}: entry {n}"
        img = _field(rec, "image", where)
        if cut == "lotlip" and not Path(img).name.startswith("sa_"):
            continue
        conv = _field(rec, "conversations", where, list)
        if len(conv) < 2:
            raise DatasetError(f"{where}: 'conversations' needs the human turn and the caption turn")
        text = _field(conv[1], "value", f"{where}: conversations[1]")
        path = base / img
        if not path.is_file():
            index = _image_index(base) if index is None else index
            path = index.get(Path(img).name, path)
        ids.append(str(rec.get("id", Path(img).stem)))
        images.append(str(path))
        texts.append(lotlip_text(text) if cut == "lotlip" else text.replace("\n", " ").strip())
        if len(ids) == count:
            break
    what = "SA-1B entries" if cut == "lotlip" else "entries"
    _check_count(f"{ann}", len(ids), count, what)
    name = f"sharegpt4v_{count}" + ("" if cut == "lotlip" else "_longclip")
    _check_images(images, name, f"expected the images under {base}")
    prov = {"source": str(base), "files": files_sha256([ann], base), "first_n": count, "cut": cut}
    return _evalset(name, ids, images, texts, prov)


def _share4v_1k(root: str | Path, count: int | None = 1000, annotations: str | Path | None = None) -> EvalSet:
    return load_sharegpt4v(root, 1000 if count is None else count, annotations)


def _share4v_10k(root: str | Path, count: int | None = 10000, annotations: str | Path | None = None) -> EvalSet:
    return load_sharegpt4v(root, 10000 if count is None else count, annotations)


def _share4v_1k_longclip(root: str | Path, count: int | None = 1000, annotations: str | Path | None = None) -> EvalSet:
    return load_sharegpt4v(root, 1000 if count is None else count, annotations, cut="longclip")


for _b in (
    Benchmark("urban1k", "urban1k", load_urban1k, hub={"root": "hf://BeichenZhang/Urban1k"}),
    Benchmark("docci", "docci", load_docci),
    Benchmark("dci", "dci", load_dci),
    Benchmark("sdci", "sdci", load_sdci),
    Benchmark("iiw", "iiw", load_iiw, roots=("root", "docci_root", "dci_root")),
    Benchmark("sharegpt4v_1k", "sharegpt4v_1k", _share4v_1k),
    Benchmark("sharegpt4v_10k", "sharegpt4v_10k", _share4v_10k),
    Benchmark("sharegpt4v_1k_longclip", "sharegpt4v_1k_longclip", _share4v_1k_longclip),
):
    BENCHMARKS.add(_b.name, _b)


def load_benchmark(name: str, roots: dict[str, str | Path]) -> EvalSet:
    """Load a registered benchmark; ``roots`` maps the loader's root names (``root``, and for
    IIW ``docci_root``, ``dci_root``) to directories or ``hf://`` names."""
    b = BENCHMARKS.get(name)
    missing = [r for r in b.roots if r not in roots and r not in b.hub]
    if missing:
        raise DatasetError(f"benchmark {name!r} needs directories for {missing} (got {sorted(roots)})")
    unknown = sorted(set(roots) - set(b.roots))
    if unknown:
        raise DatasetError(f"benchmark {name!r}: unknown root(s) {unknown}; it reads {list(b.roots)}")
    kw = {r: roots.get(r, b.hub.get(r)) for r in b.roots}
    return b.loader(**kw)
