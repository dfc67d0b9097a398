"""File fingerprints and manifest paths, shared by the exporter, the engine builder and the runtime checks."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class UnsafePathError(ValueError):
    """A manifest names a file outside its own directory."""


def confined_path(root: str | Path, name: object, *, what: str) -> Path:
    """``root / name`` when ``name`` is a plain relative path that stays inside ``root`` (symlinks resolved).

    Manifests are data: an absolute path, a ``..`` or a link pointing outside would make the
    runtime read (or a replacement delete) files that are not part of the artifact directory.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UnsafePathError(f"{root}: {what} {name!r} is not a relative path inside the directory")
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{root}: {what} {name!r} leads outside the directory (to {real})")
    return path
