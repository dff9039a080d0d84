"""One registry for every plug-in point: named items registered in code, advertised by installed
packages through an entry-point group, or read from ``*.json`` files in folders.

A :class:`Registry` maps names to items (classes, or instances such as prompt families and
retrieval protocols). Items come from three places, looked up in this order:

1. code: ``@REG.register("name")`` on a class, or ``REG.add("name", obj)`` for any object;
2. an entry-point group (``[project.entry-points."<group>"]`` in another package's
   ``pyproject.toml``): the names are read when first needed, and each item is imported only
   when it is asked for, so listing names never imports a plug-in;
3. JSON folders (:meth:`Registry.add_json_folder`): every ``<name>.json`` in a folder is an
   item, built by the registry's ``json_loader(name, doc, path)`` when it is first asked for.
   A package ships one folder (``Registry(..., json_package=("pkg", "configs/things"))``) and
   users add their own (``add_json_folder(path)``, or the ``json_env`` variable: folders
   separated by ``os.pathsep``); a later folder's file overrides an earlier folder's file of the
   same name (so a user folder can replace a packaged config), never an item from 1 or 2.
   Folders are listed once, when first needed; :meth:`Registry.refresh` lists them again.

``get(name)`` fails with ``error`` (default :class:`~d2s.config.ConfigError`) naming the kind
and listing every known name. ``get("package.module:attr")`` loads an object that is not
registered anywhere (quick experiments). :class:`PluginRegistry` adds what densecap's plug-in
classes need (a ``Params`` dataclass parsed with :func:`d2s.config.from_dict`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from .config import ConfigError, from_dict

log = logging.getLogger(__name__)

T = TypeVar("T")

JsonLoader = Callable[[str, dict, Path], Any]


def _default_json_loader(name: str, doc: Any, path: Path) -> Any:
    return doc


class Registry(Generic[T]):
    """Named items of one kind.

    ``kind``: what an item is, for messages ("caption source"). ``group``: the entry-point group
    (None: none). ``base``: items must be subclasses (classes) or instances of it. ``error``: the
    exception type of lookup failures. ``name_attr``: the attribute a registered *class* gets its
    name in (None: left alone). ``json_package`` / ``json_env`` / ``json_loader``: see the module
    docstring. The registry is also a read-only mapping (``name in REG``, ``REG[name]``, ``list(REG)``).
    """

    def __init__(
        self,
        kind: str,
        group: str | None = None,
        *,
        base: type | None = None,
        error: type[Exception] = ConfigError,
        name_attr: str | None = "name",
        json_package: tuple[str, str] | None = None,
        json_env: str | None = None,
        json_loader: JsonLoader | None = None,
        items: str = "any",
    ):
        self.kind = kind
        self.group = group
        self.base = base
        self.error = error
        self.name_attr = name_attr
        self.json_loader = json_loader or _default_json_loader
        self.json_env = json_env
        if items not in ("any", "class", "instance"):
            raise ValueError(f"items must be 'any', 'class' or 'instance', not {items!r}")
        self.items_are = items  # with ``base``: subclasses only, instances only, or either
        self._items: dict[str, T] = {}
        self._eps: dict[str, EntryPoint] | None = None
        self._json_folders: list[Any] = []  # Path or importlib.resources Traversable
        self._json_files: dict[str, Any] | None = None
        self._json_env_seen = ""
        self._json_items: dict[str, T] = {}
        if json_package is not None:
            self.add_json_folder(json_package)

    # ---- registering ---------------------------------------------------------------
    def add(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Register ``obj`` under ``name``; a second, different object for a name is an error
        unless ``replace``."""
        if not replace and name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
        self._check(name, obj, where="")
        if self.name_attr and isinstance(obj, type):
            setattr(obj, self.name_attr, name)
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@CAPTION_SOURCES.register("my-source")`` above a class (or a function)."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def add_json_folder(self, folder: str | Path | tuple[str, str]) -> None:
        """Make every ``<name>.json`` in ``folder`` an item; ``(package, "sub/dir")`` is a folder
        shipped inside an installed package. Later folders override earlier ones, name by name."""
        if isinstance(folder, tuple):
            from importlib import resources

            pkg, sub = folder
            trav = resources.files(pkg)
            for part in sub.split("/"):
                trav = trav / part
            self._json_folders.append(trav)
        else:
            self._json_folders.append(Path(folder))
        self._json_files = None
        self._json_items.clear()

    def refresh(self) -> None:
        """Forget discovered entry points and JSON files (they are read again when next needed)."""
        self._eps = None
        self._json_files = None
        self._json_items.clear()

    # ---- discovery -----------------------------------------------------------------
    def entry_point_targets(self) -> dict[str, str]:
        """Entry points of the group: name -> 'module:attr' (nothing is imported)."""
        return {n: ep.value for n, ep in self._entry_points().items()}

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._eps is None:
            self._eps = {}
            if self.group:
                for ep in entry_points(group=self.group):
                    self._eps.setdefault(ep.name, ep)
        return self._eps

    def _folders(self) -> list[Any]:
        env = os.environ.get(self.json_env, "") if self.json_env else ""
        return self._json_folders + [Path(p) for p in env.split(os.pathsep) if p]

    def json_files(self) -> dict[str, Any]:
        """name -> the ``.json`` file it comes from (after overrides). Read again when the
        environment variable naming extra folders changes."""
        env = os.environ.get(self.json_env, "") if self.json_env else ""
        if env != self._json_env_seen:
            self._json_env_seen = env
            self._json_files = None
            self._json_items.clear()
        if self._json_files is None:
            files: dict[str, Any] = {}
            for folder in self._folders():
                if not folder.is_dir():
                    continue
                for p in sorted(folder.iterdir(), key=lambda p: p.name):
                    if p.name.endswith(".json"):
                        files[p.name[: -len(".json")]] = p
            self._json_files = files
        return self._json_files

    def targets(self) -> dict[str, str]:
        """name -> where the item comes from ('module:attr' or a JSON file), without loading any."""
        out = {n: str(p) for n, p in self.json_files().items()}
        out.update(self.entry_point_targets())
        for n, obj in self._items.items():  # what get() returns first
            out[n] = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
        return dict(sorted(out.items()))

    def names(self) -> list[str]:
        """Every known name, sorted (entry-point and JSON items without importing or reading them)."""
        return sorted(set(self._items) | set(self._entry_points()) | set(self.json_files()))

    # ---- lookup --------------------------------------------------------------------
    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        ep = self._entry_points().get(name)
        if ep is not None:
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in names itself, the others still work
                raise self.error(f"cannot load {self.kind} {name!r} ({ep.value}): {exc}") from None
            self._check(name, obj, where=f" ({ep.value})")
            return self.add(name, obj)
        if name in self.json_files():
            return self._load_json(name)
        if ":" in name:  # 'package.module:attr' for unpackaged plug-ins
            mod, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as exc:
                raise self.error(f"cannot load {self.kind} {name!r}: {exc}") from None
            self._check(name, obj, where="")
            return obj
        raise self.error(f"unknown {self.kind} {name!r}; registered: {self.names()}")

    def _load_json(self, name: str) -> T:
        if name not in self._json_items:
            path = self.json_files()[name]
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise self.error(f"{self.kind} {name!r}: cannot read {path}: {exc}") from None
            obj = self.json_loader(name, doc, path)
            self._check(name, obj, where=f" ({path})")
            self._json_items[name] = obj
        return self._json_items[name]

    def _check(self, name: str, obj: Any, where: str) -> None:
        if self.base is None:
            return
        is_cls = isinstance(obj, type)
        ok = issubclass(obj, self.base) if is_cls else isinstance(obj, self.base)
        ok = ok and {"class": is_cls, "instance": not is_cls}.get(self.items_are, True)
        if not ok:
            what = f"{self.base.__module__}.{self.base.__qualname__}"
            shape = {"class": "subclass", "instance": "instance"}.get(self.items_are, "subclass or instance")
            raise self.error(f"{self.kind} {name!r}{where} is not a {what} ({shape})")

    def items(self) -> list[tuple[str, T]]:
        """(name, item) for every name; an entry point that fails to load is left out with a warning."""
        out = []
        for n in self.names():
            try:
                out.append((n, self.get(n)))
            except Exception as exc:  # noqa: BLE001 - one broken plug-in must not hide the others
                log.warning("%s", exc)
        return out

    # ---- read-only mapping ---------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def keys(self) -> list[str]:
        return self.names()

    def values(self) -> list[T]:
        return [v for _, v in self.items()]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, names={self.names()})"


class PluginRegistry(Registry[type[T]]):
    """A registry of plug-in classes configured by a ``Params`` dataclass (densecap's image
    sources, caption sources and filters): ``parse_params`` / ``create`` build them from plain
    config data, and ``refused_params`` (a class attribute ``{field: reason}``) names fields a
    configuration must not hold."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("items", "class")
        super().__init__(*args, **kwargs)

    def parse_params(self, name: str, params: dict[str, Any] | None, where: str) -> Any:
        cls = self.get(name)
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


def doc_line(obj: Any) -> str:
    """The first paragraph of an item's docstring, on one line."""
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
