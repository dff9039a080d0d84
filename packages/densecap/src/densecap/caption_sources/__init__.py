"""Caption sources: the plug-in point that turns samples into dense texts.

See ``docs/caption-sources.md``. The built-in ones register themselves on import.
"""

from . import importer, oracle, synthetic_errors, vllm_offline, vllm_server  # noqa: F401  (registration)
from .base import CAPTION_SOURCES, CaptionSource, CaptionSourceError, SamplingParams

__all__ = ["CAPTION_SOURCES", "CaptionSource", "CaptionSourceError", "SamplingParams"]
