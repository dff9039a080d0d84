"""Evaluation sets: images + sparse captions (+ one long text per image where there is one)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import files_sha256

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file that cannot be read as an evaluation set; the message names file and entry."""


@dataclass
class EvalSet:
    """What a retrieval benchmark needs from a dataset.

    ``images`` holds encoded image bytes or paths to image files (read lazily, batch by
    batch). ``captions[j]`` belongs to image ``txt_to_img[j]``. ``dense`` holds one long
    text per image that has one, for ``dense_img[k]``. ``image_shards[i]`` is the shard image
    ``i`` came from (shard-backed sets; errors name shard and key).
    """

    name: str
    image_ids: list[str]
    images: list[bytes | str]
    captions: list[str]
    txt_to_img: np.ndarray
    dense: list[str] = field(default_factory=list)
    dense_img: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_shards: list[str] = field(default_factory=list)
    # where the set came from, for the protocol manifest: {"source": where the files lay,
    # "files": {name: sha256} of the annotation files read, ...}
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.images:
            raise DatasetError(f"{self.name}: no images")
        if len(self.captions) != len(self.txt_to_img):
            raise DatasetError(f"{self.name}: {len(self.captions)} captions but {len(self.txt_to_img)} mapping entries")


def _take(caps: list[str], max_captions: int) -> list[str]:
    return caps[:max_captions] if max_captions > 0 else caps


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test", max_captions: int = 5) -> EvalSet:
    """A Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``).

    Images are ``image_root/filepath/filename`` (``filepath`` absent for Flickr30K). The
    protocol uses 5 captions per image: COCO images with 6-7 keep their first 5
    (``max_captions=0`` keeps all).
    """
    json_path, image_root = Path(json_path), Path(image_root)
    try:
        doc = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: no such Karpathy split file") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{json_path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{json_path}: expected an object with an 'images' list (Karpathy split format)")
    ids, images, caps, mapping = [], [], [], []
    splits_seen = set()
    for n, entry in enumerate(doc["images"]):
        where = f"{json_path}: images[{n}]"
        if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
            raise DatasetError(f"{where}: needs 'filename' and 'sentences'")
        splits_seen.add(entry.get("split"))
        if entry.get("split") != split:
            continue
        sents = [s.get("raw") if isinstance(s, dict) else None for s in entry["sentences"]]
        if not sents or not all(isinstance(s, str) for s in sents):
            raise DatasetError(f"{where}: 'sentences' must be a non-empty list of {{'raw': str}}")
        path = image_root / entry.get("filepath", "") / entry["filename"]
        i = len(images)
        ids.append(str(entry.get("cocoid", entry.get("imgid", entry["filename"]))))
        images.append(str(path))
        for s in _take(sents, max_captions):
            caps.append(s.strip())
            mapping.append(i)
    if not images:
        raise DatasetError(
            f"{json_path}: no images in split {split!r}; splits present: {sorted(map(str, splits_seen))}"
        )
    missing = [p for p in images[:5] if not Path(p).exists()]
    if missing:
        raise DatasetError(f"{json_path}: image file {missing[0]} not found (is --image-root {image_root} right?)")
    prov = {"source": str(json_path), "files": files_sha256([json_path]), "split": split, "max_captions": max_captions}
    return EvalSet(f"{json_path.stem}:{split}", ids, images, caps, np.asarray(mapping, np.int64), provenance=prov)


def load_shards(shards_dir: str | Path, split: str = "test", max_captions: int = 5) -> EvalSet:
    """The project's shards (``d2s.shards``): sparse captions from ``Sample.sparse``, the first
    kept dense text (``Sample.kept_dense()``) as the image's long text. Duplicates named by the
    directory's dedup index (``integrity/dedup.json``, ``densecap dedup``) are left out: a
    duplicate image's sample, a duplicate dense text (logged with their count)."""
    from d2s.integrity import read_integrity
    from d2s.schema import Sample
    from d2s.shards import iter_records, split_shards

    integrity = read_integrity(shards_dir)
    skipped = 0
    ids, images, caps, mapping, dense, dense_img, shards = [], [], [], [], [], [], []
    for rec in iter_records(split_shards(shards_dir, split)):
        s = integrity.apply(Sample.from_wds(rec), rec.get("__url__"))
        if s is None:
            skipped += 1
            continue
        i = len(images)
        ids.append(s.key)
        images.append(s.image)
        shards.append(str(rec.get("__url__")))
        for c in _take(list(s.sparse), max_captions):
            caps.append(c)
            mapping.append(i)
        kept = s.kept_dense()
        if kept:
            dense.append(kept[0].text)
            dense_img.append(i)
    if skipped:
        log.info("%s/%s: %d duplicate image(s) skipped (integrity/dedup.json)", shards_dir, split, skipped)
    if not images:
        raise DatasetError(f"{shards_dir}: split {split!r} has no samples")
    no_caps = sorted(set(range(len(images))) - set(mapping))
    if no_caps:
        raise DatasetError(f"{shards_dir}: split {split!r}: sample {ids[no_caps[0]]!r} has no sparse caption")
    if dense and len(dense) < len(images):
        log.warning(
            "%s/%s: %d of %d images have a kept dense text; long-text retrieval uses those only",
            shards_dir,
            split,
            len(dense),
            len(images),
        )
    files = files_sha256(sorted(set(shards)), shards_dir)
    prov = {"source": str(shards_dir), "files": files, "split": split, "max_captions": max_captions}
    return EvalSet(
        f"{Path(shards_dir).name}:{split}",
        ids,
        images,
        caps,
        np.asarray(mapping, np.int64),
        dense,
        np.asarray(dense_img, np.int64),
        shards,
        prov,
    )
