"""The densecap configuration: one dataclass tree, parsed with d2s.config.from_dict.

The same :class:`DensecapConfig` is what ``densecap run --config`` reads and what the
``densecap`` pipeline stage takes as ``params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .filters import DEFAULT_FILTERS


@dataclass
class PluginConfig:
    """A registered plug-in by name, with its own parameters (validated by its Params dataclass)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # caption sources: recorded as DenseText.source (default: the type)


@dataclass
class DensecapConfig:
    source: PluginConfig = field(default_factory=lambda: PluginConfig("shards"))
    captioners: list[PluginConfig] = field(default_factory=lambda: [PluginConfig("synthetic-oracle")])
    filters: list[PluginConfig] = field(default_factory=lambda: [PluginConfig(n) for n in DEFAULT_FILTERS])
    num_workers: int = 1
    batch_size: int = 64
    recaption: bool = False  # caption again even when a sample already has a good text from this source
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        labels = [c.label or c.type for c in self.captioners]
        if len(set(labels)) != len(labels):
            raise ValueError(f"captioners need distinct labels (DenseText.source), got {labels}")


@dataclass
class RunConfig(DensecapConfig):
    out: str = ""
    report: str = ""  # default: <out>/report
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.out:
            raise ValueError("out (the output shard directory) is required")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}")
