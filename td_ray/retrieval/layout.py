"""Where a built index lives, what its metadata says, and which student builds and searches it.

A dense build is a directory ``index/builds/<key>/`` (key: the documents, the student and the index settings)
holding the passage map, the trained index and the index itself (shards, or one IVF index and its on-disk lists).
``index/index_meta.json`` names the build in use; it is replaced atomically once a build is complete, so a
changed build is made beside the old one and swapped in, and evaluate never reads a half-made one.
"""
from __future__ import annotations

import json
from pathlib import Path

from td_ray.errors import ModelError, StaleIndexError
from td_ray.workspace import INDEX_META, STUDENT_DIR, Workspace, atomic_write_text

BUILDS = "index/builds"
PASSAGE_MAP = "passages.arrow"
TRAINED = "trained.faiss"
EMBEDDINGS_TABLE = "embeddings.parquet"


def read_index_meta(workspace: Workspace) -> dict:
    """What the index in use holds (kind, dim, docs, passages or tokens, model, key, and for a dense build its
    directory, factory, files and search defaults); {} when none was built."""
    path = Path(workspace.path(INDEX_META))
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_index_meta(workspace: Workspace, meta: dict) -> None:
    atomic_write_text(Path(workspace.path(INDEX_META)), json.dumps(meta, indent=1) + "\n")


def build_path(workspace: Workspace, meta: dict, name: str = "") -> Path:
    """A file of the build `meta` names (the build directory itself without `name`)."""
    if "build" not in meta:
        raise StaleIndexError(f"{workspace.path(INDEX_META)} names no index build; re-run the index stage")
    return Path(workspace.path(meta["build"])) / name if name else Path(workspace.path(meta["build"]))


def student_path(model: str | None, workspace: Workspace) -> str:
    """The encoder to index and search with: `model` (index.model), else the student the distill stage saved."""
    if model:
        return model
    path = Path(workspace.path(STUDENT_DIR))
    if not path.is_dir():
        raise ModelError(f"no student at {path}; run the distill stage first, or set index.model")
    return str(path)
