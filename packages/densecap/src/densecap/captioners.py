"""Deprecated name of :mod:`densecap.caption_sources` (kept so that existing imports work).

``import densecap.captioners`` and ``from densecap.captioners.vllm_server import ...`` give the
very same module objects as ``densecap.caption_sources`` (no class is defined twice).
"""

import importlib
import sys

from .caption_sources import *  # noqa: F403
from .caption_sources import __all__  # noqa: F401

for _sub in ("base", "importer", "oracle", "prompts", "vllm_offline", "vllm_server"):
    _mod = importlib.import_module(f"densecap.caption_sources.{_sub}")
    sys.modules[f"{__name__}.{_sub}"] = _mod
    globals()[_sub] = _mod
