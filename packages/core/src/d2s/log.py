"""One logging setup for every entry point (console + optional file)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(stage_tag)s%(name)s: %(message)s"

_STAGE_TAG = [""]


def tag_stage(name: str | None) -> None:
    """Start this process's log lines with ``[name]`` (a stage of a pipeline that runs several
    at once, ``d2s run --jobs``), or with nothing again (None)."""
    _STAGE_TAG[0] = f"[{name}] " if name else ""


class _StageTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.stage_tag = _STAGE_TAG[0]
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when set up), so
    redirected or captured stderr (pytest, notebooks, contextlib.redirect_stderr) works."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | int | None = None, file: str | Path | None = None) -> None:
    """Configure the root logger once; later calls only add a file handler."""
    level = level or os.environ.get("D2S_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_d2s", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        h.addFilter(_StageTag())
        h._d2s = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(file)
        fh.setFormatter(logging.Formatter(FORMAT))
        fh.addFilter(_StageTag())
        fh._d2s = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_log_level(parser: argparse.ArgumentParser, subparsers=()) -> None:
    """``--log-level`` on ``parser`` and on each subcommand parser (a list, or the action
    ``add_subparsers`` returned, called after every subcommand is added), so that both
    ``prog --log-level DEBUG sub ...`` and ``prog sub ... --log-level DEBUG`` work; the one
    after the subcommand wins."""
    help_ = "DEBUG, INFO (default; or $D2S_LOG_LEVEL), WARNING, ERROR"
    parser.add_argument("--log-level", default=None, type=str.upper, help=help_)
    subs = getattr(subparsers, "choices", None)
    unique = {id(sp): sp for sp in (subs.values() if subs is not None else subparsers)}  # aliases share a parser
    for sp in unique.values():
        # SUPPRESS: a subcommand without the option leaves the top-level value in place
        sp.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, help=help_)
