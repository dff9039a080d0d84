"""The densecap configuration: one dataclass tree, parsed with d2s.config.from_dict.

:class:`DensecapConfig` is the one configuration of a densecap job. The ``densecap`` pipeline
stage's ``params`` (:class:`StageConfig`) extend it with this machine's share of the work
(``rank`` / ``world_size``); what ``densecap run --config`` reads (:class:`RunConfig`) extends
the stage's with where to write (``out`` / ``report``). They compose by inheritance, as
vse_train's ``TrainSpec`` / ``TrainConfig`` do: every field sits at the top level of the YAML.

Fields marked ``metadata=EXECUTION`` decide how a job runs, not what it writes (workers, batch
size, progress bar, executor, rank): they stay out of the shard fingerprint and of the pipeline
stage's cache key (:func:`execution_fields`).

Parsing it also parses every plug-in's ``params`` through the plug-in's registry, so a wrong
plug-in name or parameter fails when the configuration is read (``d2s run --dry-run``
included), naming the field, e.g. ``caption_sources[0].params: unknown field(s) ['temperatur']``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2s.config import ConfigError

from .executors.base import ExecutorConfig
from .filters import DEFAULT_FILTERS
from .grounding import GroundingConfig

# Placeholder used only while validating a source whose 'path' the pipeline stage fills in
# from its 'shards' input at run time.
_PATH_FROM_INPUT = "<path from the stage's shards input>"

# Paths of built-in sources that must exist before a run starts (they are the user's data,
# never an earlier stage's output, which a pipeline passes as the stage's 'shards' input):
# source type -> {param: "file" | "dir"}.
_SOURCE_PATHS: dict[str, dict[str, str]] = {
    "folder": {"path": "dir", "captions": "file"},
    "karpathy": {"path": "file", "image_root": "dir"},
}

#: field metadata: the field decides how a job runs, not what it writes
EXECUTION = {"execution": True}


def execution_fields(cls: type) -> tuple[str, ...]:
    """The fields of config class ``cls`` marked ``EXECUTION``, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("execution"))


@dataclass
class PluginConfig:
    """A registered plug-in by name, with its own parameters (validated by its Params dataclass)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # caption sources: recorded as DenseText.source (default: the type)


def _parse_plugin(registry: Any, plugin: PluginConfig, where: str, params: dict[str, Any] | None = None) -> Any:
    """Parse ``plugin.params`` with the plug-in's Params; ConfigError names ``where``."""
    try:
        registry.get(plugin.type)
    except ConfigError as exc:
        raise ConfigError(f"{where}.type: {exc}") from None
    return registry.parse_params(plugin.type, plugin.params if params is None else params, f"{where}.params")


def _check_source_paths(source: PluginConfig) -> None:
    for key, kind in _SOURCE_PATHS.get(source.type, {}).items():
        value = source.params.get(key)
        if not value or value == _PATH_FROM_INPUT:
            continue
        p = Path(str(value))
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"source.params.{key}: {p} is not a directory")
        if kind == "file" and not p.is_file():
            raise ConfigError(f"source.params.{key}: {p} does not exist")


@dataclass
class DensecapConfig:
    """What a densecap job does (and with how many workers); see docs/pipeline-format.md."""

    source: PluginConfig = field(default_factory=lambda: PluginConfig("shards"))
    caption_sources: list[PluginConfig] = field(default_factory=lambda: [PluginConfig("synthetic-oracle")])
    filters: list[PluginConfig] = field(default_factory=lambda: [PluginConfig(n) for n in DEFAULT_FILTERS])
    num_workers: int = field(default=1, metadata=EXECUTION)
    batch_size: int = field(default=64, metadata=EXECUTION)
    recaption: bool = False  # caption again even when a sample already has a good text from this source
    progress: bool = field(default=True, metadata=EXECUTION)
    # one image extension per split, so that Arrow readers (Hugging Face datasets) see every image:
    # 'auto' = the split's most common format (its first image's for shard / dataset sources), other
    # formats re-encoded (PNG losslessly, JPEG at quality 95; meta.original_format records theirs);
    # 'jpg' / 'png' / 'webp' = that one; 'keep' = every image as it comes (mixed extensions)
    image_ext: Literal["auto", "keep", "jpg", "png", "webp"] = "auto"
    executor: ExecutorConfig = field(default_factory=ExecutorConfig, metadata=EXECUTION)
    # score every sentence of the kept dense texts against the image, after the filters; and
    # optionally drop or repair captions by those scores (densecap.grounding, docs/grounding.md)
    grounding: GroundingConfig | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        labels = [c.label or c.type for c in self.caption_sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"caption_sources need distinct labels (DenseText.source), got {labels}")
        try:
            # a missing source 'path' is allowed here: the pipeline stage takes it from its
            # 'shards' input, and a run without one fails when it builds the source
            self.validate_plugins(path_from_input=True)
        except ConfigError as exc:
            # a plain ValueError, so that from_dict prefixes it with where the config sits
            # (e.g. "stage 'captions' params: ...")
            raise ValueError(str(exc)) from None

    def validate_plugins(self, *, path_from_input: bool = False) -> None:
        """Parse every plug-in's params with its registry and check the source's data paths."""
        from .caption_sources import CAPTION_SOURCES
        from .filters import FILTERS
        from .images import IMAGE_SOURCES

        src_params = dict(self.source.params)
        if path_from_input and "path" not in src_params:
            try:
                P = getattr(IMAGE_SOURCES.get(self.source.type), "Params", None)
            except ConfigError as exc:
                raise ConfigError(f"source.type: {exc}") from None
            if P is not None and "path" in {f.name for f in dataclasses.fields(P)}:
                src_params["path"] = _PATH_FROM_INPUT
        _parse_plugin(IMAGE_SOURCES, self.source, "source", src_params)
        _check_source_paths(self.source)
        for i, c in enumerate(self.caption_sources):
            _parse_plugin(CAPTION_SOURCES, c, f"caption_sources[{i}]")
        for i, f in enumerate(self.filters):
            _parse_plugin(FILTERS, f, f"filters[{i}]")
        if self.grounding is not None:
            self.grounding.validate()


@dataclass(kw_only=True)
class StageConfig(DensecapConfig):
    """``params`` of the ``densecap`` pipeline stage: the config plus this machine's share.

    With ``world_size`` N > 1, units go round-robin to ranks 0..N-1 (as ``densecap run
    --rank/--world-size``); several machines writing to one shared output directory each run
    the stage with their own ``rank``.
    """

    rank: int = field(default=0, metadata=EXECUTION)
    world_size: int = field(default=1, metadata=EXECUTION)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}")


@dataclass(kw_only=True)
class RunConfig(StageConfig):
    """What ``densecap run`` reads: the stage's params plus where to write."""

    out: str = ""
    report: str = ""  # default: <out>/report

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.out:
            raise ValueError("out (the output shard directory) is required")
