"""The node-local cache: what a node copies out of an object-store workspace (models, CTranslate2 conversions, text
lookups, students, index files) and the hashes of files it has read, each kept once per content and node.

Its root is ``$TD_RAY_CACHE``, else ``~/.cache/td-ray``. Filling an entry takes a per-node file lock, so the actors
of one node that ask for the same entry at once download it once.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TD_RAY_CACHE") or "~/.cache/td-ray").expanduser()


@contextlib.contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock among this node's processes (released when the holder exits, however it exits)."""
    path = cache_root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
