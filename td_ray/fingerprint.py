"""Fingerprints: what identifies an input or a setting, so a stage can tell that nothing changed and skip its work.

A file is identified by the sha256 of its content, a directory by those of every file under it (hidden temporary
files aside), and a stage's inputs and settings by a short hash of all of them together. Content, not modification
times: a model or collection downloaded or copied onto another node has the same fingerprint there. Each file's
hash is kept in the node-local cache under its (path, size, mtime, inode), so a file is read once per node.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from td_ray.node_cache import cache_root


def path_fingerprint(path: str | os.PathLike) -> list:
    """The sha256 of a file; for a directory, [relative path, sha256] of each file under it."""
    path = Path(path)
    if path.is_file():
        return [file_sha256(path)]
    entries = []
    for root, directories, files in os.walk(path):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            entries.append([str((Path(root) / name).relative_to(path)), file_sha256(Path(root) / name)])
    return entries


def file_sha256(path: Path) -> str:
    """The file's sha256, read once per version of the file on this node (memoised in the node-local cache)."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    memo = cache_root() / "sha256" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.txt"
    if memo.is_file():
        return memo.read_text(encoding="ascii")
    content = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            content.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    temporary = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    temporary.write_text(content.hexdigest(), encoding="ascii")
    os.replace(temporary, memo)
    return content.hexdigest()


def digest(*parts: object) -> str:
    """A 16-hex-digit hash of JSON-serialisable `parts` (dict keys sorted).

    >>> digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
