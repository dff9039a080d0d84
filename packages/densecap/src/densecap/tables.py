"""Caption tables (csv / tsv / jsonl / json / parquet) read with pandas: one reader shared by the
``folder`` image source (its captions file) and the ``import`` caption source (format ``table``).

Errors name the file and the line (``caps.jsonl:2: not valid JSON``) or the column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from d2s.config import ConfigError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def read_table(
    path: Path, what: str, *, suffixes: tuple[str, ...] = TABLE_SUFFIXES, mapping: tuple[str, str] = ("", "")
):
    """The rows of ``path`` as a DataFrame (csv / tsv cells as strings, empty cells as '').

    ``what`` starts error messages (e.g. 'import', 'captions file'). A ``.json`` file is a list of
    row objects, or, with ``mapping=(key_column, value_column)``, an object ``{key: value}``.
    ``df.attrs["where"]`` holds, per row, where it sits in the file ('path:LINE' or 'path[i]').
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ConfigError(f"{what}: {path}: unsupported table format {suffix!r} ({', '.join(s[1:] for s in suffixes)})")
    if suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:  # an empty file is an empty table
            df = pd.DataFrame()
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{what}: {path}: {exc}") from None
        where = [f"{path}:{i + 2}" for i in range(len(df))]  # line 1 is the header
    elif suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: {path}: {exc}") from None
        where = [f"{path}: row {i + 1}" for i in range(len(df))]
    elif suffix == ".jsonl":
        lines, rows = _jsonl_rows(path)
        df = pd.DataFrame.from_records(rows)
        where = [f"{path}:{n}" for n in lines]
    else:
        rows = _json_rows(path, what, mapping)
        df = pd.DataFrame.from_records(rows)
        where = [f"{path}[{i}]" for i in range(len(df))]
    df.attrs["where"] = where
    return df


def _jsonl_rows(path: Path) -> tuple[list[int], list[dict]]:
    lines, rows = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object, got {row!r}")
            lines.append(n)
            rows.append(row)
    return lines, rows


def _json_rows(path: Path, what: str, mapping: tuple[str, str]) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc}") from None
    if isinstance(doc, dict) and all(mapping):
        return [{mapping[0]: k, mapping[1]: v} for k, v in doc.items()]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise ConfigError(f"{what}: {path}: expected a JSON list of objects")
    return doc


def missing(value: Any) -> bool:
    """A cell a row does not have (jsonl / json rows without the field)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def require_columns(df, path: Path, what: str, columns: list[str]) -> None:
    cols = [str(c) for c in df.columns]
    absent = [c for c in columns if c not in cols]
    if absent:
        raise ConfigError(f"{what}: {path}: no column {absent[0]!r} (columns: {cols})")
