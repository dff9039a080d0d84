"""densecap: dense captions for any image collection."""

__version__ = "0.1.0"
