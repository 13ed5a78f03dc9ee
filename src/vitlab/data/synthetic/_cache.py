"""The cache of generated data sets: where it lives, how an entry is named, and atomic writes."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "cache_file", "cache_root", "load_or_generate"]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where generated sets live: ``cache_dir``, else ``$VITLAB_CACHE/synthetic``, else ``~/.cache/vitlab/synthetic``.

    ``$VITLAB_CACHE`` is read on every call, so tests can point it elsewhere.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("VITLAB_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vitlab"
    return base / "synthetic"


def cache_file(name: str, key: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The cache path of a set; ``key`` holds every parameter the data depend on, the generator version included."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = f"{key['split']}-n{key['n']}-s{key['seed']}" if {"split", "n", "seed"} <= key.keys() else "set"
    return cache_root(cache_dir) / f"{name}-{readable}-{digest}.npz"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temp file beside it, then move it into place in one step.

    Readers never see a half-written file, and two writers racing on one key both leave a complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_or_generate(
    name: str, key: dict[str, Any] | None, load: Callable[..., Any], generate: Callable[[], Any], cache_dir: Any = None
) -> Any:
    """The set cached under ``name`` and ``key`` (``load(path, key=key)``), else ``generate()``, saved there.

    ``key=None`` skips the cache. A damaged or foreign entry (``DataError`` on load) is regenerated and replaced.
    """
    from ..errors import DataError  # here: the cache module imports nothing of the package at import time

    path = cache_file(name, key, cache_dir) if key is not None else None
    if path is not None and path.is_file():
        try:
            return load(path, key=key)
        except DataError:
            pass
    scenes = generate()
    if path is not None:
        scenes.save(path, key=key)
    return scenes
