"""Cached, atomic builds of offline assets: built in a temp directory beside the target, renamed into place."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
"""File in a finished build holding its build key; a build is reused only when the key matches."""


def is_complete(root: Path, key: str) -> bool:
    marker = root / COMPLETE_MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8") == key


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing any old ``dst``; ``dst`` is never half-made."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cached_build(out_dir: Path, key: str, build: Callable[[Path], None], what: str, force: bool = False) -> Path:
    """Run ``build(staged_dir)`` unless ``out_dir`` holds a complete build with ``key``; returns ``out_dir``.

    A killed build leaves nothing under the final name; a build another process finished first is kept.
    """
    out_dir = Path(out_dir).absolute()
    if not force and is_complete(out_dir, key):
        logger.info("%s already built in %s", what, out_dir)
        return out_dir
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.build-"))
    try:
        staged = tmp / "build"
        staged.mkdir()
        build(staged)
        (staged / COMPLETE_MARKER).write_text(key, encoding="utf-8")
        if not force and is_complete(out_dir, key):
            logger.info("another process finished the same %s build in %s; keeping it", what, out_dir)
        else:
            replace_dir(staged, out_dir)
            logger.info("built %s in %s in %.1f s", what, out_dir, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
