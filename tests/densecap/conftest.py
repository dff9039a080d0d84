"""Fixtures for the densecap tests: tiny image collections (the real vLLM server fixtures,
``tiny_vlm``, ``vllm_python`` and ``vllm_server``, are session-wide: tests/conftest.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def png_bytes(color=(200, 30, 30), size=(40, 30), fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """A small synthetic world: train 24 images (3 shards of 8), val 8 (1 shard)."""
    from d2s.synthetic import SplitSpec, WorldConfig, write_world

    out = tmp_path_factory.mktemp("world") / "shards"
    write_world(out, WorldConfig(), [SplitSpec("train", 24), SplitSpec("val", 8)], shard_size=8, progress=False)
    return out


def densecap_cmd(python: str | Path | None = None) -> list[str]:
    return [str(python or sys.executable), "-m", "densecap.cli"]


def run_densecap(args: list[str], *, python=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("HF_HUB_OFFLINE", "1")
    return subprocess.run(densecap_cmd(python) + args, capture_output=True, text=True, env=e, timeout=timeout, cwd=REPO)
