"""Files under the roots only: a request names a root and a relative path inside it.

Refused, before the file system is touched: an absolute path, a drive or a backslash, any
``..`` part, and a path that still leads out of its root once symbolic links are followed.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .config import Named, UIError


class Roots:
    def __init__(self, roots: list[Named]):
        self.by_name = {r.name: r.path.resolve() for r in roots}

    def names(self) -> list[str]:
        return list(self.by_name)

    def resolve(self, root: str, rel: str) -> Path:
        """The file ``rel`` under root ``root``; a UIError (403 / 404) says why not."""
        if root not in self.by_name:
            raise UIError(f"root {root!r}: not one of the roots this app serves ({', '.join(self.by_name)})", 404)
        if not rel:
            raise UIError("path: empty", 400)
        if "\\" in rel or "\x00" in rel or rel.startswith(("/", "~")) or (len(rel) > 1 and rel[1] == ":"):
            raise UIError(f"path {rel!r}: refused (absolute paths are not served; give a path inside the root)", 403)
        parts = PurePosixPath(rel).parts
        if ".." in parts:
            raise UIError(f"path {rel!r}: refused ('..' leads out of the root)", 403)
        base = self.by_name[root]
        target = (base / PurePosixPath(*parts)).resolve()
        try:
            target.relative_to(base)
        except ValueError:
            raise UIError(f"path {rel!r}: refused (a link leads out of the root)", 403) from None
        if not target.is_file():
            raise UIError(f"path {rel!r}: no such file under root {root!r}", 404)
        return target

    def root_of(self, path: Path) -> tuple[str, str] | None:
        """(root name, relative path) of a file under one of the roots, for links in pages."""
        path = path.resolve()
        for name, base in self.by_name.items():
            try:
                return name, path.relative_to(base).as_posix()
            except ValueError:
                continue
        return None
