"""Fingerprints: what identifies an input or a setting, so a stage can tell that nothing changed and skip its work.

A file is identified by its size and modification time, a directory by those of every file under it (hidden
temporary files aside), and a stage's inputs and settings by a short hash of all of them together.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def path_fingerprint(path: str | os.PathLike) -> list:
    """[size, mtime_ns] of a file; for a directory, [relative path, size, mtime_ns] of each file under it."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    entries = []
    for root, directories, files in os.walk(path):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            stat = (Path(root) / name).stat()
            entries.append([str((Path(root) / name).relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return entries


def digest(*parts: object) -> str:
    """A 16-hex-digit hash of JSON-serialisable `parts` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
