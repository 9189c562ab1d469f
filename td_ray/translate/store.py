"""The translation store: every translation ever made, keyed by (id, lang, MT model, hash of the source text).

Layout under the workspace::

    translate/store/<kind>/lang=<lang>/mt=<model slug>/part-<block hash>.parquet   committed blocks
    translate/todo/<kind>.<lang>.<model slug>.parquet                              this run's work list
    translate/<kind>.<lang>.parquet                                                the current view
    translate/manifests/<time>-<run>.json                                          what each run did

A block file is written under a hidden temporary name and renamed into place, so it is either whole or absent.
Its name is a hash of the keys it holds, so a retried task rewrites the same file instead of adding a twin.
A run translates only the (id, source hash) pairs of its input that no committed block holds: re-running
translates nothing, a new language or model translates everything for it (older models' blocks are kept),
an edited source text is translated again, and a killed run resumes from its committed blocks.
The view holds exactly the current input's ids with their current translations; later stages read only it.
No Ray here: the stage drives these functions and the actors call `commit_block`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from td_ray import schemas
from td_ray.workspace import Workspace, translated

logger = logging.getLogger(__name__)

_READ_BATCH_ROWS = 65_536


def text_hash(texts: pa.Array) -> pa.Array:
    """A 16-hex-digit blake2b hash per text: the part of the key that notices an edited source."""
    return pa.array([hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).hexdigest()
                     for text in texts.to_pylist()], pa.string())


def model_slug(model: str, source_prefix: str | None, target_prefix: str | None) -> str:
    """A directory-safe, readable name for one MT model version (with the prefixes that steer it)."""
    identity = json.dumps([model, source_prefix, target_prefix])
    tail = model.rstrip("/").rsplit("/", 1)[-1]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{tail}-{target_prefix}" if target_prefix else tail).strip("-")
    return f"{readable[:60]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def store_dir(kind: str, lang: str, slug: str) -> str:
    return f"translate/store/{kind}/lang={lang}/mt={slug}"


def todo_path(kind: str, lang: str, slug: str) -> str:
    return f"translate/todo/{kind}.{lang}.{slug}.parquet"


def iter_source_batches(workspace: Workspace, relative: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    with workspace.fs.open_input_file(workspace.path(relative)) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=_READ_BATCH_ROWS, columns=columns)


def source_keys(workspace: Workspace, relative: str) -> pa.Table:
    """(id, source_hash) of every row of an ingested English table, read in batches (text is not kept)."""
    parts = [pa.table({"id": batch.column(0), "source_hash": text_hash(batch.column(1))})
             for batch in iter_source_batches(workspace, relative, ["id", "text"])]
    return pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()),
                                                           "source_hash": pa.array([], pa.string())})


def _store_dataset(workspace: Workspace, directory: str) -> pads.Dataset | None:
    if not workspace.exists(directory):
        return None
    # Hidden names (the temporary files of blocks being written) are ignored, as pyarrow does by default.
    return pads.dataset(workspace.path(directory), format="parquet", filesystem=workspace.fs,
                        schema=schemas.TRANSLATION_STORE)


def committed_keys(workspace: Workspace, directory: str) -> pa.Table:
    """(id, source_hash) of every committed row in one store directory."""
    dataset = _store_dataset(workspace, directory)
    if dataset is None:
        return pa.table({"id": pa.array([], pa.string()), "source_hash": pa.array([], pa.string())})
    return dataset.to_table(columns=["id", "source_hash"])


def plan(current: pa.Table, committed: pa.Table) -> pa.Table:
    """The current (id, source_hash) pairs that no committed block holds."""
    return current.join(committed, ["id", "source_hash"], join_type="left anti")


def write_todo(workspace: Workspace, english: str, todo: pa.Table, relative: str) -> int:
    """Write the rows of `english` whose ids are in `todo`, with the hashes `plan` gave them, as this run's work list."""
    wanted = todo["id"].combine_chunks()
    hashes = todo["source_hash"].combine_chunks()
    rows = 0
    with workspace.atomic_writer(relative, schemas.TRANSLATE_TODO) as writer:
        for batch in iter_source_batches(workspace, english, ["id", "text"]):
            chosen = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
            if chosen.num_rows:
                table = pa.table({"id": chosen.column(0), "text": chosen.column(1),
                                  "source_hash": hashes.take(pc.index_in(chosen.column(0), value_set=wanted))})
                # Small row groups: Ray Data's read tasks and blocks follow them, and a block is a commit unit.
                writer.write_table(table, row_group_size=4096)
                rows += table.num_rows
    return rows


def block_name(ids: list[str], hashes: list[str]) -> str:
    digest = hashlib.sha256("\n".join(f"{i}\t{h}" for i, h in zip(ids, hashes)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def commit_block(workspace: Workspace, directory: str, table: pa.Table) -> str:
    """Write one translated block atomically into `directory`; returns its file name."""
    table = table.select(schemas.TRANSLATION_STORE.names).cast(schemas.TRANSLATION_STORE)
    name = block_name(table["id"].to_pylist(), table["source_hash"].to_pylist())
    target = workspace.path(f"{directory}/{name}")
    temporary = workspace.path(f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp")
    workspace.fs.create_dir(workspace.path(directory), recursive=True)
    try:
        pq.write_table(table, temporary, filesystem=workspace.fs)
        workspace.fs.move(temporary, target)
    except BaseException:
        if workspace.fs.get_file_info(temporary).type != pafs.FileType.NotFound:
            workspace.fs.delete_file(temporary)
        raise
    return name


def block_names(workspace: Workspace, directory: str) -> list[str]:
    """The committed block files of one store directory."""
    if not workspace.exists(directory):
        return []
    infos = workspace.fs.get_file_info(pafs.FileSelector(workspace.path(directory)))
    return [info.base_name for info in infos if info.base_name.startswith("part-")]


def clear_partial(workspace: Workspace, directory: str) -> int:
    """Delete the temporary files of blocks a killed run left half-written (one job per store at a time)."""
    if not workspace.exists(directory):
        return 0
    infos = workspace.fs.get_file_info(pafs.FileSelector(workspace.path(directory)))
    partial = [info.path for info in infos if info.base_name.startswith(".part-") and info.base_name.endswith(".tmp")]
    for path in partial:
        workspace.fs.delete_file(path)
    return len(partial)


def write_view(workspace: Workspace, directory: str, current: pa.Table, kind: str, lang: str, key: str) -> int:
    """Write ``translate/<kind>.<lang>.parquet``: one row per current (id, source_hash), streamed from the store.

    Fails, committing nothing, unless every current id has exactly one translation. `key` (what the view was
    made from) goes in the file's metadata, so an unchanged view is not rewritten.
    """
    from td_ray.raydata import check_exactly_once

    dataset = _store_dataset(workspace, directory)
    relative = translated(kind, lang)
    wanted = _joined_keys(current["id"], current["source_hash"])
    written = np.zeros(len(wanted), dtype=bool)
    rows = 0

    def validate(table: pa.Table) -> None:
        check_exactly_once(table, ["id"], current.select(["id"]), relative)

    with workspace.atomic_writer(relative, schemas.TRANSLATIONS, validate=validate, validate_columns=["id"],
                                 metadata=lambda: {"td_ray_view": key}) as writer:
        for batch in dataset.to_batches(batch_size=_READ_BATCH_ROWS) if dataset is not None else []:
            positions = pc.index_in(_joined_keys(batch.column("id"), batch.column("source_hash")), value_set=wanted)
            keep = np.zeros(batch.num_rows, dtype=bool)
            for row, position in enumerate(positions.to_numpy(zero_copy_only=False)):
                # Rows of old sources or other edits are skipped; a key committed twice is written once.
                if not np.isnan(position) and not written[int(position)]:
                    written[int(position)] = keep[row] = True
            if keep.any():
                table = pa.Table.from_batches([batch]).filter(pa.array(keep))
                writer.write_table(table.select(schemas.TRANSLATIONS.names).cast(schemas.TRANSLATIONS))
                rows += table.num_rows
    return rows


def _joined_keys(ids: pa.Array, hashes: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(ids, hashes, "\t")


def write_manifest(workspace: Workspace, run_id: str, entries: list[dict]) -> str:
    """Record what one run did, per (kind, lang, model), as ``translate/manifests/<time>-<run>.json``."""
    # Microseconds: two runs within one second must still sort oldest first.
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    relative = f"translate/manifests/{stamp}-{run_id[:8]}.json"
    path = workspace.path(relative)
    workspace.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with workspace.fs.open_output_stream(temporary) as handle:
        handle.write(json.dumps({"run_id": run_id, "time": stamp, "entries": entries}, indent=1).encode())
    workspace.fs.move(temporary, path)
    return relative


def read_manifests(workspace: Workspace) -> list[dict]:
    """Every run's manifest, oldest first."""
    if not workspace.exists("translate/manifests"):
        return []
    infos = workspace.fs.get_file_info(pafs.FileSelector(workspace.path("translate/manifests")))
    manifests = []
    for info in sorted(infos, key=lambda item: item.base_name):
        if info.base_name.endswith(".json"):
            with workspace.fs.open_input_stream(info.path) as handle:
                manifests.append(json.loads(handle.read()))
    return manifests
