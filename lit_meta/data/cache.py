"""The cache protocol every image DataModule follows: fingerprint, load, build once, save atomically.

A cache is one ``.pt`` dict beside its sources (or under ``cache_dir``, ``$LIT_META_CACHE``,
``~/.cache/lit_meta``: :func:`cache_file`) holding ``version`` (:data:`CACHE_VERSION`),
``key`` (a :func:`fingerprint` of the sources' :func:`file_stamp` and the options) and the
data. :func:`cached` reuses it while both match, else builds the data, saves it with
:func:`lit_meta.checkpoint.atomic_torch_save` and returns it. What a cache holds and how it
is built stays with its DataModule.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from lit_meta.checkpoint import atomic_torch_save

CACHE_VERSION = 1


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (path.name, stat.st_size, stat.st_mtime_ns)


def cache_file(root: Path, cache_dir: str | os.PathLike | None, stem: str) -> Path:
    """Where the tensor cache of ``root`` lives: ``cache_dir`` if given, else ``root`` when it is
    writable, else ``$LIT_META_CACHE`` or ``~/.cache/lit_meta`` (named after ``root``'s path)."""
    if cache_dir is not None:
        return Path(cache_dir) / f"{stem}.pt"
    # A folder without write bits counts as read-only even for root, who could write anyway.
    if os.access(root, os.W_OK) and root.stat().st_mode & 0o222:
        return root / f"{stem}.pt"
    base = Path(os.environ.get("LIT_META_CACHE", Path.home() / ".cache" / "lit_meta"))
    return base / f"{stem}-{fingerprint(str(root.resolve()))}.pt"


def load_cache(path: Path, key: str, stacklevel: int = 2) -> dict[str, Any] | None:
    """The cached dict at ``path`` if it was built from the same sources and options (``key``), else None."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable cache {path}: {error}", stacklevel=stacklevel)
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("version") != CACHE_VERSION:
        return None
    return data


def cached(path: Path, key: str, build: Callable[[], dict[str, Any]],
           usable: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The cache at ``path`` if its ``key`` matches (and ``usable(data)``, when given), else
    ``{"version": CACHE_VERSION, "key": key, **build()}``, saved atomically to ``path`` first."""
    data = load_cache(path, key, stacklevel=3)
    if data is not None and (usable is None or usable(data)):
        return data
    data = {"version": CACHE_VERSION, "key": key, **build()}
    atomic_torch_save(data, path)
    return data
