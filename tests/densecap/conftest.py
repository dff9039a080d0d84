"""Fixtures for the densecap tests: tiny image collections and a real vLLM server.

The vLLM fixtures are session-scoped: the tiny LLaVA is built once and one server is
started for the whole session (and always terminated). They need ``.venv-vllm`` (built
by ``scripts/setup_vllm_cpu.sh``); without it the tests that use them FAIL, by design.
"""

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


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    from densecap.testing.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm") / "tiny-llava")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    from densecap.testing.vllm_server import vllm_python as find

    try:
        return find()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def vllm_server(tiny_vlm, vllm_python, tmp_path_factory):
    """One real vLLM server for the session (restartable by tests that kill it)."""
    from densecap.testing.vllm_server import VLLMServer

    srv = VLLMServer(tiny_vlm, name="tiny-llava", scratch=tmp_path_factory.mktemp("vllm-scratch"), max_num_seqs=8)
    try:
        srv.start()
        print(f"\n[vllm] server healthy after {srv.start_seconds:.1f}s on {srv.base_url}", file=sys.stderr)
        yield srv
    finally:
        srv.stop()


def run_densecap(args: list[str], *, python=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("HF_HUB_OFFLINE", "1")
    return subprocess.run(densecap_cmd(python) + args, capture_output=True, text=True, env=e, timeout=timeout, cwd=REPO)
