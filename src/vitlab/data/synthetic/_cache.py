"""The cache of generated data sets: where it lives, how an entry is named, and atomic writes."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "cache_file", "cache_root", "load_npz_set", "load_or_generate", "save_npz_set"]


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


def save_npz_set(path: str | Path, arrays: dict[str, Any], meta: dict[str, Any], version: int) -> Path:
    """Tensors ``arrays`` and JSON ``meta`` (plus ``format_version``) as one compressed ``.npz``, written atomically."""
    import numpy as np

    out = {k: v.numpy() for k, v in arrays.items()}
    out["meta"] = np.frombuffer(json.dumps({"format_version": version, **meta}).encode(), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez_compressed(f, **out))


def load_npz_set(
    path: str | Path, names: tuple[str, ...], what: str, version: int, key: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors ``names`` and the meta of a file written by :func:`save_npz_set`; ``what`` names the set in errors.

    Raises:
        DataError: the file is missing, unreadable, of another format version, or (with ``key``) of other parameters.
    """
    import zipfile

    import numpy as np
    import torch

    from ..errors import DataError

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (*names, "meta") if k not in npz.files]
            if missing:
                raise DataError(f"{what} file {path} lacks arrays {missing}")
            arrays = {k: torch.from_numpy(npz[k]) for k in names}
            meta = json.loads(npz["meta"].tobytes().decode())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from e
    if meta.get("format_version") != version:
        raise DataError(f"{what} file {path} has format version {meta.get('format_version')}; expected {version}")
    if key is not None and meta.get("key") != json.loads(json.dumps(key)):
        raise DataError(f"{what} file {path} was generated with other parameters than asked for")
    return arrays, meta
