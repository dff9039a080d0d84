"""The sample schema: one WebDataset sample per image.

A sample on disk is three tar members sharing a key::

    <key>.<ext>   the encoded image, bytes exactly as read from the source
    <key>.json    a JSON object, see :class:`Sample` (``schema_version`` first)

``docs/shard-format.md`` is the normative description; this module is its code.
Every JSON field has a fixed type so that Arrow-based readers (``datasets``)
infer one schema for a whole split. Free-form values go in string-keyed maps of
strings or floats, never in structures whose shape varies between samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SampleError(ValueError):
    """A sample that does not follow the schema. The message names shard and key."""

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"shard {shard}" if shard else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.shard = shard
        self.key = key


@dataclass
class Sentence:
    """One sentence of a dense text scored against its image (``d2s.grounding``).

    ``score`` is the calibrated grounding score (how much better the sentence matches its own
    image than it matches reference images, in standard deviations); ``similarity`` is the raw
    cosine. ``removed`` marks a sentence a repair took out of the text.
    """

    text: str
    score: float
    similarity: float
    removed: bool = False


@dataclass
class SentenceTruth:
    """What is known to be true of one sentence (the ``synthetic-errors`` caption source):
    ``label`` is ``"true"`` or the kind of error that was put into it. For evaluation only:
    no filter or scorer reads it."""

    text: str
    label: str


@dataclass
class DenseText:
    """One long description of an image, with where it came from and what the filters said.

    ``verdict`` is ``"keep"`` or the reason the first failing filter gave
    (``"too_short"``, ``"repetition"``, ...). ``scores`` holds every filter's
    numeric score so that thresholds can be changed later without re-running them.
    ``sentences`` holds the grounding scores of every sentence (empty until scored, see
    ``d2s.grounding``) and ``scorer`` names what scored them; after a repair ``text`` keeps
    the supported sentences, ``original_text`` the text as captioned, and the removed
    sentences stay in ``sentences`` with ``removed`` set. ``truth`` is known only for
    synthetic captions with planted errors.
    """

    text: str
    source: str
    model: str = ""
    prompt: str = ""
    params: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    verdict: str = "keep"
    error: str = ""
    sentences: list[Sentence] = field(default_factory=list)
    scorer: str = ""
    original_text: str = ""
    truth: list[SentenceTruth] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.verdict == "keep" and not self.error

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DenseText:
        """From its JSON object; TypeError / ValueError name the bad field."""
        d = dict(d)
        d["sentences"] = [Sentence(**x) for x in d.get("sentences") or []]
        d["truth"] = [SentenceTruth(**x) for x in d.get("truth") or []]
        return cls(**d)


@dataclass
class Sample:
    """One image and everything known about it."""

    key: str
    image: bytes
    image_ext: str
    id: str
    dataset: str
    split: str
    path: str = ""
    sparse: list[str] = field(default_factory=list)
    dense: list[DenseText] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    # ---- helpers used by every stage ------------------------------------------------
    def kept_dense(self) -> list[DenseText]:
        return [d for d in self.dense if d.kept]

    # ---- (de)serialisation ----------------------------------------------------------
    def json_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "id": self.id,
            "dataset": self.dataset,
            "split": self.split,
            "path": self.path,
            "image_ext": self.image_ext,
            "sparse": list(self.sparse),
            "dense": [asdict(d) for d in self.dense],
            "meta": dict(self.meta),
        }

    def to_wds(self) -> dict[str, Any]:
        """The dict a ``webdataset.TarWriter`` writes: ``__key__``, image bytes, json bytes."""
        validate_key(self.key)
        ext = normalise_ext(self.image_ext, key=self.key)
        if not self.image:
            raise SampleError("empty image bytes", key=self.key)
        return {
            "__key__": self.key,
            ext: self.image,
            "json": json.dumps(self.json_dict(), ensure_ascii=False).encode("utf-8"),
        }

    @classmethod
    def from_wds(cls, record: dict[str, Any], *, shard: str | None = None) -> Sample:
        """Parse a raw (undecoded) webdataset record; errors name shard and key."""
        key = record.get("__key__")
        shard = shard or record.get("__url__")
        if not key:
            raise SampleError("record has no __key__", shard=shard)
        raw = record.get("json")
        if raw is None:
            raise SampleError("missing json member", shard=shard, key=key)
        try:
            doc = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(f"malformed json member: {exc}", shard=shard, key=key) from None
        return cls.from_json_dict(key, doc, record, shard=shard)

    @classmethod
    def from_json_dict(cls, key: str, doc: Any, members: dict[str, Any], *, shard: str | None = None) -> Sample:
        def fail(msg: str) -> SampleError:
            return SampleError(msg, shard=shard, key=key)

        if not isinstance(doc, dict):
            raise fail("json member is not an object")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise fail(f"unknown schema_version {version!r} (this code reads version {SCHEMA_VERSION})")
        ext = doc.get("image_ext")
        if not isinstance(ext, str):
            raise fail("json field 'image_ext' missing or not a string")
        image = members.get(ext)
        if image is None:
            present = sorted(k for k in members if not k.startswith("__"))
            raise fail(f"missing image member '.{ext}' (members present: {present})")
        for name, typ in (("id", str), ("dataset", str), ("split", str), ("sparse", list), ("dense", list)):
            if not isinstance(doc.get(name), typ):
                raise fail(f"json field {name!r} missing or not a {typ.__name__}")
        if not all(isinstance(c, str) for c in doc["sparse"]):
            raise fail("json field 'sparse' must be a list of strings")
        dense = []
        for i, d in enumerate(doc["dense"]):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str) or not isinstance(d.get("source"), str):
                raise fail(f"json field dense[{i}] needs string 'text' and 'source'")
            try:
                dense.append(DenseText.from_json(d))
            except TypeError as exc:
                raise fail(f"json field dense[{i}]: {exc}") from None
        return cls(
            key=key,
            image=bytes(image),
            image_ext=ext,
            id=doc["id"],
            dataset=doc["dataset"],
            split=doc["split"],
            path=doc.get("path", ""),
            sparse=list(doc["sparse"]),
            dense=dense,
            meta=dict(doc.get("meta") or {}),
        )


def normalise_ext(ext: str, *, key: str | None = None) -> str:
    ext = ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SampleError(f"unsupported image extension {ext!r}; expected one of {IMAGE_EXTENSIONS}", key=key)
    return ext


def validate_key(key: str) -> None:
    """WebDataset splits member names at the first dot: keys must not contain dots or slashes."""
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise SampleError("keys must be non-empty, without '.', '/' or a leading '_'", key=key)


def convert_image(data: bytes, ext: str) -> bytes:
    """Re-encode image bytes as ``ext`` (PNG losslessly, JPEG at quality 95)."""
    import io

    from PIL import Image

    ext = normalise_ext(ext)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if ext in ("jpg", "jpeg") and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(
            buf,
            format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
            **({"quality": 95} if ext in ("jpg", "jpeg") else {}),
        )
    return buf.getvalue()


def sniff_image_ext(data: bytes) -> str | None:
    """The extension that matches the image bytes' magic number, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None
