"""Where a built index lives, what its metadata says, and which student builds and searches it.

A dense build is a directory ``index/builds/<key>/`` (key: the documents, the student and the index settings)
holding the passage map, the trained index and the index itself (shards, or one IVF index and its on-disk lists).
``index/index_meta.json`` names the build in use; it is replaced atomically once a build is complete, so a
changed build is made beside the old one and swapped in, and evaluate never reads a half-made one. A ColBERT
build holds the compressed token index instead (`td_ray.retrieval.plaid`).

The student may be a registered ``models:/name@alias`` (or ``models:/name/version``) URI: its files are downloaded
once per version into ``index/models/<name>-v<version>/``, so a moved alias is a different student.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from td_ray.errors import ModelError, StaleIndexError
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.workspace import EVAL_DOCS, INDEX_META, STUDENT_DIR, Workspace

BUILDS = "index/builds"
PASSAGE_MAP = "passages.arrow"
TRAINED = "trained.faiss"
EMBEDDINGS_TABLE = "embeddings.parquet"
CODES_TABLE = "codes.parquet"
DELETED = "deleted.npy"
"""Passage numbers (ascending) of documents changed or removed since they were indexed: never returned."""
DOCUMENTS = "documents.parquet"
"""(id, fingerprint of the text) of every document the build holds: what an append compares the collection with."""
REGISTERED = "index/models"
POOL_SETTINGS = {"batch_size", "num_actors", "max_actors", "num_cpus_per_actor", "num_gpus_per_actor", "device",
                 "task_cpus", "incremental"}
"""Index settings that change how fast a build is made, never what it holds."""


def read_index_meta(workspace: Workspace) -> dict:
    """What the index in use holds (kind, dim, docs, passages or tokens, model, key, and for a dense build its
    directory, factory, files and search defaults); {} when none was built."""
    return json.loads(workspace.read_text(INDEX_META)) if workspace.exists(INDEX_META) else {}


def write_index_meta(workspace: Workspace, meta: dict) -> None:
    workspace.write_text(INDEX_META, json.dumps(meta, indent=1) + "\n")


def build_path(workspace: Workspace, meta: dict, name: str = "") -> Path:
    """A file of the build `meta` names, on this node's disk (copied from an object-store workspace when it exists
    there); the build's local folder without `name`."""
    if "build" not in meta:
        raise StaleIndexError(f"{workspace.location(INDEX_META)} names no index build; re-run the index stage")
    mirror = workspace.mirror(meta["build"])
    if name and workspace.exists(f"{meta['build']}/{name}"):
        mirror.fetch(name)
    return mirror.folder / name if name else mirror.folder


def build_folder(workspace: Workspace, meta: dict) -> Path:
    """The build's folder on this node's disk, holding every file `meta` lists (and its deleted set, if any)."""
    for name in meta["files"] + [DELETED]:
        build_path(workspace, meta, name)
    return build_path(workspace, meta)


def student_path(model: str | None, workspace: Workspace) -> str:
    """The encoder directory to index and search with: `model` (index.model: a directory, or a registered
    ``models:/`` URI, downloaded), else the student the distill stage saved."""
    if model and model.startswith("models:/"):
        return _registered_student(model, workspace)
    if model:
        return model
    if not workspace.exists(STUDENT_DIR):
        raise ModelError(f"no student at {workspace.location(STUDENT_DIR)}; run the distill stage first, or set "
                         "index.model")
    return str(workspace.local_copy(STUDENT_DIR))


def _registered_student(uri: str, workspace: Workspace) -> str:
    """The student directory of a registered model version, downloaded into the workspace once per version.
    MLflow must point at the registry (the stages configure it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, alias = uri.removeprefix("models:/"), None
    if "@" in name:
        name, alias = name.split("@", 1)
    elif "/" in name:
        name, number = name.rsplit("/", 1)
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        raise ModelError(f"index.model {uri!r}: no such registered model version in {mlflow.get_tracking_uri()} "
                         f"({str(error).splitlines()[0][:160]}); register the student (the distill stage does), or "
                         "name a version or alias that exists") from None
    target = workspace.local_dir(REGISTERED) / f"{name}-v{version.version}"
    student = student_in_model(target)
    if student is None:
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(temporary))
        if student_in_model(temporary) is None:
            raise ModelError(f"{uri} (version {version.version}) holds no td-ray student (the pyfunc's `student` "
                             "artifact); register it with td-ray's distill stage")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(temporary, target)
        student = student_in_model(target)
    return str(student)


def student_in_model(folder: Path) -> Path | None:
    """The student folder inside a downloaded td-ray model version: the pyfunc's `student` artifact, where its
    MLmodel file says it is (MLflow names the folder after the directory that was logged); None when absent."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors", {}).get("python_function", {})
    path = (flavor.get("artifacts") or {}).get("student", {}).get("path")
    return folder / path if path and (folder / path).is_dir() else None


def index_key(workspace: Workspace, model: str, index_settings: dict) -> str:
    """What a build is made from: the documents, the student's files and every index setting that changes what
    it holds (`index_settings`, the index section dumped as JSON; the pool's settings are left out)."""
    return digest(workspace.table_identity(EVAL_DOCS), settings_key(model, index_settings))


def settings_key(model: str, index_settings: dict) -> str:
    """What a build's passages are encoded and compressed with: the student's files and the index settings that
    change what it holds. Documents added to a build of the same settings key can be appended to it."""
    settings = {name: value for name, value in index_settings.items() if name not in POOL_SETTINGS}
    return digest(path_fingerprint(model), settings)


def passage_map_paths(workspace: Workspace, meta: dict) -> list[Path]:
    """The build's passage maps in faiss-id order: the first build's, then each append's."""
    return [build_path(workspace, meta, name) for name in meta.get("passage_maps", [PASSAGE_MAP])]


def check_current(workspace: Workspace, meta: dict, model: str, index_settings: dict) -> None:
    """Refuse an index built from other documents, another student or other settings than the config's."""
    if meta.get("key") != index_key(workspace, model, index_settings):
        raise StaleIndexError(f"the index in {workspace.path(meta.get('build', 'index'))} was built from other "
                              f"documents, another student or other index settings than this config's (student "
                              f"{model}); re-run the index stage")


def add_deleted(directory: Path, passages: np.ndarray) -> int:
    """Add passage numbers to the build's deleted set (written atomically); returns its size."""
    path = directory / DELETED
    known = np.load(path) if path.is_file() else np.zeros(0, np.int64)
    merged = np.union1d(known, np.asarray(passages, dtype=np.int64))
    temporary = directory / f".{DELETED}.{os.getpid()}.tmp.npy"
    np.save(temporary, merged)
    os.replace(temporary, path)
    return len(merged)
