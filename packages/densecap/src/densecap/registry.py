"""Registries of named plug-ins (image sources, caption sources, filters).

Each registry holds classes registered in this package with :meth:`Registry.register`
and, lazily, those other installed packages advertise through an entry-point group
(``[project.entry-points."densecap.caption_sources"]`` etc.), so a plug-in never has to
touch this package. Every plug-in class has a ``Params`` dataclass parsed with
:func:`d2s.config.from_dict` and a one-paragraph docstring that ``densecap --help`` shows.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from d2s.config import ConfigError, from_dict

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._classes: dict[str, type[T]] = {}
        self._entry_points_loaded = False

    def register(self, name: str):
        """Class decorator: ``@CAPTION_SOURCES.register("my-source")``."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._classes[name]!r})")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._classes:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the others
                log.warning("%s plug-in %r (%s) failed to load: %s", self.kind, ep.name, ep.value, exc)
                continue
            cls.name = ep.name
            self._classes[ep.name] = cls

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return [(n, self.get(n)) for n in self.names()]

    def get(self, name: str) -> type[T]:
        self._load_entry_points()
        cls = self._classes.get(name)
        if cls is None and ":" in name:  # 'package.module:Class' for unpackaged plug-ins
            mod, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"cannot load {self.kind} {name!r}: {exc}") from None
        if cls is None:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return cls

    def parse_params(self, name: str, params: dict[str, Any] | None, where: str) -> Any:
        cls = self.get(name)
        # fields a plug-in refuses with a reason (e.g. a secret that would be written to disk)
        for key, why in getattr(cls, "refused_params", {}).items():
            if isinstance(params, dict) and key in params:
                raise ConfigError(f"{where}.{key}: not accepted: {why}")
        P = getattr(cls, "Params", None)
        if P is None or not dataclasses.is_dataclass(P):
            if params:
                raise ConfigError(f"{where}: {self.kind} {name!r} takes no parameters")
            return None
        return from_dict(P, params or {}, where)

    def create(self, name: str, params: dict[str, Any] | None, where: str, **kwargs: Any) -> T:
        cls = self.get(name)
        return cls(self.parse_params(name, params, where), **kwargs)  # type: ignore[call-arg]


def describe_params(cls: type) -> list[str]:
    """'name: type = default' lines of a plug-in's Params dataclass (for --help)."""
    P = getattr(cls, "Params", None)
    if P is None or not dataclasses.is_dataclass(P):
        return []
    lines = []
    for f in dataclasses.fields(P):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"{f.name}: {tp} = {default}")
    return lines


def doc_line(cls: type) -> str:
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
