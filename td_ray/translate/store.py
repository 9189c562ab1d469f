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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from td_ray import schemas
from td_ray.config import TranslateConfig, TranslateTarget
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.keys import HashSet, key_hashes
from td_ray.workspace import Workspace, translated

logger = logging.getLogger(__name__)

_READ_BATCH_ROWS = 65_536


def text_hash(texts: pa.Array) -> pa.Array:
    """A 16-hex-digit blake2b hash per text: the part of the key that notices an edited source."""
    return pa.array([hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).hexdigest()
                     for text in texts.to_pylist()], pa.string())


def model_slug(target: TranslateTarget, model_dir: Path, settings: TranslateConfig) -> str:
    """A directory-safe, readable name for one MT model version and everything that changes its output: the
    model's files (names and content), its prefixes, and the segmentation, decoding and quality settings (the
    quality checks decide which rows are retried)."""
    identity = {
        "model": target.model, "source_prefix": target.source_prefix, "target_prefix": target.target_prefix,
        "files": path_fingerprint(model_dir),
        "settings": settings.model_dump(mode="json", include=OUTPUT_SETTINGS),
    }
    tail = target.model.rstrip("/").rsplit("/", 1)[-1]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{tail}-{target.target_prefix}" if target.target_prefix else tail)
    return f"{readable.strip('-')[:60]}-{digest(identity)[:8]}"


OUTPUT_SETTINGS = {"source_lang", "split_sentences", "max_input_length", "decoding", "quality"}
"""The translate settings that change what a model writes (batching and threads only change how fast)."""


def store_dir(kind: str, lang: str, slug: str) -> str:
    return f"translate/store/{kind}/lang={lang}/mt={slug}"


def todo_path(kind: str, lang: str, slug: str) -> str:
    return f"translate/todo/{kind}.{lang}.{slug}.parquet"


def _store_dataset(workspace: Workspace, directory: str) -> pads.Dataset | None:
    if not workspace.exists(directory):
        return None
    # Hidden names (the temporary files of blocks being written) are ignored, as pyarrow does by default.
    return pads.dataset(workspace.path(directory), format="parquet", filesystem=workspace.fs,
                        schema=schemas.TRANSLATION_STORE)


def _scan(dataset: pads.Dataset | None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The store's rows batch by batch, reading one block ahead (pyarrow's default read-ahead holds dozens of
    batches in memory)."""
    if dataset is None:
        return iter(())
    return dataset.to_batches(columns=columns, batch_size=_READ_BATCH_ROWS, batch_readahead=1, fragment_readahead=1)


def committed_keys(workspace: Workspace, directory: str) -> HashSet:
    """The (id, source_hash) hashes of every committed row in one store directory."""
    return HashSet.of(_scan(_store_dataset(workspace, directory), ["id", "source_hash"]))


@dataclass
class Plan:
    """What one pass over the English input found: its rows, those written to the work list, and the hashes of
    every current (id, source_hash), which the view is then built from."""

    source_rows: int
    todo_rows: int
    current: HashSet


def write_todo(workspace: Workspace, english: str, committed: HashSet, relative: str) -> Plan:
    """Write the rows of `english` whose (id, source hash) no committed block holds as this run's work list,
    in one streamed pass that also collects the current keys. The work list is removed when empty."""
    source_rows = todo_rows = 0
    current = np.empty(workspace.row_count(english), dtype=np.uint64)  # filled in place: no copies
    with workspace.atomic_writer(relative, schemas.TRANSLATE_TODO) as writer:
        for batch in workspace.iter_batches(english, ["id", "text"], _READ_BATCH_ROWS):
            keys = pa.table({"id": batch.column(0), "source_hash": text_hash(batch.column(1))})
            hashes = key_hashes(keys)
            current[source_rows:source_rows + batch.num_rows] = hashes
            missing = ~committed.contains(hashes)
            source_rows += batch.num_rows
            if missing.any():
                chosen = pa.array(np.flatnonzero(missing))
                table = pa.table({"id": batch.column(0).take(chosen), "text": batch.column(1).take(chosen),
                                  "source_hash": keys["source_hash"].take(chosen)})
                # Small row groups: Ray Data's read tasks and blocks follow them, and a block is a commit unit.
                writer.write_table(table, row_group_size=4096)
                todo_rows += table.num_rows
    if not todo_rows:
        workspace.fs.delete_file(workspace.path(relative))
    return Plan(source_rows, todo_rows, HashSet(current))


def commit_block(workspace: Workspace, directory: str, table: pa.Table, lease: str | None = None) -> str:
    """Write one translated block atomically into `directory`, while the run holds the stage's `lease`; returns its
    file name."""
    return workspace.commit_block(directory, table, schemas.TRANSLATION_STORE, ["id", "source_hash"], lease)


def block_names(workspace: Workspace, directory: str) -> list[str]:
    """The committed block files of one store directory."""
    return workspace.block_names(directory)


def write_view(workspace: Workspace, directory: str, current: HashSet, english: str, kind: str, lang: str,
               key: str, mt_model: str) -> int:
    """Write ``translate/<kind>.<lang>.parquet``: one row per current (id, source_hash), streamed from the store.

    Each store row is looked up once in `current` (a sorted hash array, built in one pass over the input);
    a key committed twice is written once. Fails, committing nothing, unless every id of `english` has exactly
    one translation. `key` (what the view was made from) goes in the file's metadata, so an unchanged view is
    neither rewritten nor checked again, and so does `mt_model` (the model version, for lineage).
    """
    dataset = _store_dataset(workspace, directory)
    relative = translated(kind, lang)
    written = np.zeros(len(current), dtype=bool)
    with workspace.exactly_once_writer(relative, schemas.TRANSLATIONS, ["id"],
                                       expected=workspace.key_batches(english, ["id"]),
                                       metadata=lambda: {"td_ray_view": key, "td_ray_mt_model": mt_model}) as writer:
        for batch in _scan(dataset):
            hashes = key_hashes(batch, ["id", "source_hash"])
            positions = np.minimum(np.searchsorted(current.hashes, hashes), max(len(current) - 1, 0))
            # Rows of old sources or other edits are skipped; a key committed twice is written once.
            wanted = np.flatnonzero(current.contains(hashes) & ~written[positions])
            _, first = np.unique(positions[wanted], return_index=True)
            keep = np.zeros(batch.num_rows, dtype=bool)
            keep[wanted[first]] = True
            written[positions[keep]] = True
            if keep.any():
                writer.write(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    return writer.rows


def write_manifest(workspace: Workspace, run_id: str, entries: list[dict]) -> str:
    """Record what one run did, per (kind, lang, model), as ``translate/manifests/<time>-<run>.json``."""
    # Microseconds: two runs within one second must still sort oldest first.
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    relative = f"translate/manifests/{stamp}-{run_id[:8]}.json"
    workspace.write_text(relative, json.dumps({"run_id": run_id, "time": stamp, "entries": entries}, indent=1))
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
