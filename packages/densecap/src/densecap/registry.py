"""Registries of densecap's named plug-ins (image sources, caption sources, filters).

They are :class:`d2s.registry.PluginRegistry` instances (the one registry of the project, see
``docs/architecture.md``): classes registered in this package with ``@REG.register("name")``
and, lazily, those other installed packages advertise through an entry-point group
(``[project.entry-points."densecap.caption_sources"]`` etc.), so a plug-in never has to touch
this package. Every plug-in class has a ``Params`` dataclass parsed with
:func:`d2s.config.from_dict` and a one-paragraph docstring that ``densecap --help`` shows.
"""

from __future__ import annotations

from d2s.registry import PluginRegistry, describe_params, doc_line

# The name this module always had for the class of its registries.
Registry = PluginRegistry

__all__ = ["PluginRegistry", "Registry", "describe_params", "doc_line"]
