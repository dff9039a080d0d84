"""import: dense captions that already exist, matched to images by id."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from d2s.config import ConfigError
from d2s.schema import DenseText, Sample

from ..tables import read_table
from .base import CAPTION_SOURCES, CaptionSource

log = logging.getLogger(__name__)


def _norm_keys(value: str) -> list[str]:
    """The keys an id / image path can be matched by: itself, its file name, its stem."""
    value = str(value).strip()
    p = Path(value)
    keys = [value, p.name, p.stem]
    if p.stem.isdigit():
        keys.append(str(int(p.stem)))  # COCO file names carry zero-padded ids
    return list(dict.fromkeys(k for k in keys if k))


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{n}: not valid JSON: {exc}") from None


@CAPTION_SOURCES.register("import")
class ImportSource(CaptionSource):
    """Existing dense captions keyed by image id: 'llava-jsonl' (D2S-VSE / LLaVA model_vqa output:
    question_id or image, text), 'sharegpt4v' (JSON list of {id, image, conversations[from gpt]}),
    or 'table' (csv / jsonl / parquet read with pandas; id_field + text_field). format 'auto' picks by
    file suffix and content. Images are matched by id, file name or file stem; unmatched images get
    no dense text from this source (counted as 'missing')."""

    @dataclass
    class Params:
        path: str
        format: Literal["auto", "llava-jsonl", "sharegpt4v", "table"] = "auto"
        id_field: str = ""  # default: question_id / image_id / id / image
        text_field: str = ""  # default: text / caption / dense
        model: str = ""  # provenance to record (e.g. 'llava-v1-13b')
        prompt: str = ""
        match: list[str] = field(default_factory=lambda: ["id", "path"])

    def __init__(self, params: ImportSource.Params, *, label: str = ""):
        super().__init__(params, label=label)
        self.model = params.model
        self.prompt = params.prompt
        self.table: dict[str, str] = {}
        self.missing = 0

    async def start(self) -> None:
        path = Path(self.params.path)
        if not path.exists():
            raise FileNotFoundError(f"import: corpus file {path} does not exist")
        fmt = self.params.format
        if fmt == "auto":
            fmt = self._guess(path)
        rows = {"llava-jsonl": self._llava, "sharegpt4v": self._sharegpt4v, "table": self._table}[fmt](path)
        n = 0
        for key, text in rows:
            n += 1
            for k in _norm_keys(key):
                self.table.setdefault(k, text)
        log.info("import: %d captions from %s (%s)", n, path, fmt)

    @staticmethod
    def _guess(path: Path) -> str:
        if path.suffix == ".json":
            return "sharegpt4v"
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline() or "{}")
            return "llava-jsonl" if "question_id" in first or ("text" in first and "image" in first) else "table"
        return "table"

    def _pick(self, row: dict, explicit: str, candidates: tuple[str, ...], where: str) -> str:
        for name in (explicit,) if explicit else candidates:
            if name in row and row[name] is not None:
                return str(row[name])
        raise ConfigError(
            f"{where}: none of the fields {[explicit] if explicit else list(candidates)} present: {list(row)}"
        )

    def _llava(self, path: Path):
        for n, row in _jsonl(path):
            where = f"{path}:{n}"
            yield (
                self._pick(row, self.params.id_field, ("question_id", "image_id", "id", "image"), where),
                self._pick(row, self.params.text_field, ("text", "caption", "answer"), where),
            )

    def _sharegpt4v(self, path: Path):
        doc = json.loads(path.read_text())
        if not isinstance(doc, list):
            raise ConfigError(f"{path}: a ShareGPT4V file is a JSON list of conversations")
        for i, row in enumerate(doc):
            where = f"{path}[{i}]"
            key = self._pick(row, self.params.id_field, ("id", "image"), where)
            answers = [
                t.get("value", "") for t in row.get("conversations", []) if t.get("from") in ("gpt", "assistant")
            ]
            if not answers:
                raise ConfigError(f"{where}: no 'gpt' turn in conversations")
            yield key, answers[0].strip()
            if "image" in row and not self.params.id_field:
                yield row["image"], answers[0].strip()

    def _table(self, path: Path):
        df = read_table(path, "import", suffixes=(".csv", ".tsv", ".jsonl", ".parquet"))
        cols = [str(c) for c in df.columns]
        idc = self.params.id_field or next((c for c in ("id", "image_id", "image", "key") if c in cols), "")
        txc = self.params.text_field or next((c for c in ("text", "caption", "dense") if c in cols), "")
        if idc not in cols or txc not in cols:
            raise ConfigError(f"import: {path}: need id and text columns (id_field/text_field); columns: {cols}")
        yield from zip(df[idc].astype(str), df[txc].astype(str))

    def lookup(self, s: Sample) -> str | None:
        cands = []
        if "id" in self.params.match:
            cands += _norm_keys(s.id)
        if "path" in self.params.match and s.path:
            cands += _norm_keys(s.path)
        for k in cands:
            if k in self.table:
                return self.table[k]
        return None

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        out: list[DenseText | None] = []
        for s in samples:
            text = self.lookup(s)
            if text is None:
                self.missing += 1
            out.append(None if text is None else self.dense(text))
        return out
