"""The workspace: one root (local path or pyarrow filesystem URI) holding every table a stage writes.

All writes are atomic: a table is written to a temporary name beside its target and renamed into place
only once complete, so a killed stage never leaves a half-written table under its final name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from td_ray.errors import STORAGE_ERRNOS, CorruptTableError, ExactlyOnceError, StorageError
from td_ray.keys import Digest, KeyBatches, describe_differences, key_hashes, repeated_hashes
from td_ray.lease import check_holder
from td_ray.node_cache import cache_root, node_lock
from td_ray.usage import mark_first_row

logger = logging.getLogger(__name__)

SERVER_COPY_LIMIT = 5 * 2**30
"""The largest object an S3 server copies in one request (CopyObject)."""
MANIFEST = ".td_ray_manifest.json"
"""Written last into a folder `Workspace.upload` put on an object store: its files and their sha256."""
SHARED_PREFIX = "workspace:"
"""How a `Workspace.share` reference starts."""


_SECRET_OPTIONS = re.compile(r"(?i)([?&](?:access_key|secret_key|session_token)=)[^&]*")


def redacted(uri: str) -> str:
    """`uri` as logs and MLflow may show it: credentials in its user part or options replaced by ***.

    >>> redacted("s3://KEY:SECRET@bucket/ws?region=eu-west-1&secret_key=S")
    's3://***@bucket/ws?region=eu-west-1&secret_key=***'
    """
    uri = re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1***@", uri)
    return _SECRET_OPTIONS.sub(r"\1***", uri)


class Workspace:
    """Paths and atomic Parquet I/O under one root."""

    def __init__(self, root: str):
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.uri = root
        self.fs.create_dir(self.root, recursive=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str) -> str:
        """Full path of `relative` inside the workspace (on the workspace's filesystem)."""
        return f"{self.root.rstrip('/')}/{relative}"

    def local_dir(self, relative: str) -> Path:
        """A local directory for `relative`, for engines that need one: the workspace's own on a local workspace; on an
        object store a node-local scratch folder, whose files `upload` then puts in the workspace."""
        path = Path(self.path(relative)) if self.is_local else self._cache_path("scratch", relative)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _cache_path(self, kind: str, relative: str) -> Path:
        where = hashlib.sha256(f"{self.uri}\0{relative}".encode()).hexdigest()[:16]
        return cache_root() / kind / f"{where}-{relative.rstrip('/').rsplit('/', 1)[-1]}"

    def local_copy(self, relative: str) -> Path:
        """The file or folder `relative` on this node's disk: itself on a local workspace; on an object store a copy
        in the node-local cache, downloaded once per version under a per-node lock, so the actors of a node share one
        copy. A folder `upload` wrote is versioned by its files' content (its manifest); anything else by its
        objects' names, sizes and times."""
        if self.is_local:
            return Path(self.path(relative))
        root = self.path(relative)
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.location(relative)} not found; run the stage that writes it first")
        files = [info] if info.type == pafs.FileType.File else sorted(
            (item for item in self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if item.type == pafs.FileType.File), key=lambda item: item.path)
        manifest = f"{relative}/{MANIFEST}"
        listed = self.read_text(manifest) if info.type == pafs.FileType.Directory and self.exists(manifest) else \
            json.dumps([[item.path, item.size, item.mtime_ns] for item in files])
        version = hashlib.sha256(listed.encode())
        base = self._cache_path("copies", relative)
        target = base.with_name(f"{base.name}-{version.hexdigest()[:12]}") / base.name.split("-", 1)[1]
        if target.exists():
            return target
        with node_lock(target.parent.name):
            if not target.exists():
                staging = target.parent.with_name(f".{target.parent.name}.{uuid.uuid4().hex[:8]}")
                for item in files:
                    local = staging / target.name / item.path[len(root):].lstrip("/") if info.type != \
                        pafs.FileType.File else staging / target.name
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self._download(item.path, local)
                for old in base.parent.glob(f"{base.name}-*"):  # earlier versions: mapped files stay readable
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(staging, target.parent)
                logger.info("copied %s to this node's cache (%s)", self.location(relative), target)
        return target

    def upload(self, local: Path, relative: str) -> None:
        """Put the local file or folder `local` at `relative`, each file under its final name only once complete (an
        object store's upload, or a copy and a rename). Nothing to do when `local` already is that place."""
        if self.is_local and Path(self.path(relative)).resolve() == local.resolve():
            return
        files = [local] if local.is_file() else sorted(path for path in local.rglob("*") if path.is_file()
                                                       and path.name != MANIFEST)
        for path in files:
            name = relative if path == local else f"{relative}/{path.relative_to(local).as_posix()}"

            def copy(sink, path: Path = path) -> None:
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 24)

            self._put(self.path(name), copy)
        if local.is_dir() and not self.is_local:  # last: what the folder holds, by content (see `local_copy`)
            from td_ray.fingerprint import path_fingerprint

            self.write_text(f"{relative}/{MANIFEST}", json.dumps(path_fingerprint(local)))

    def mirror(self, relative: str) -> Mirror:
        """The folder `relative` as a process works on it: see `Mirror`."""
        return Mirror(self, relative)

    def share(self, path: str | None) -> str | None:
        """A reference to the driver-local file or folder `path` (a model, a lookup) that `resolve` turns into a local
        path on any node: `path` itself on a local workspace (every node mounts it) or for anything that is not a
        local path (a hub name); else ``workspace:shared/<content hash>/<name>``, uploaded once per content."""
        if path is None or self.is_local or path.startswith(SHARED_PREFIX) or not Path(path).exists():
            return path
        from td_ray.fingerprint import digest, path_fingerprint

        local = Path(path)
        relative = f"shared/{digest(path_fingerprint(local))}/{local.name}"
        if not self.exists(f"{relative}.complete"):
            self.upload(local, relative)
            self.write_text(f"{relative}.complete", "ok\n")
            logger.info("shared %s with the cluster as %s", path, self.location(relative))
        return SHARED_PREFIX + relative

    def resolve(self, reference: str | None) -> str | None:
        """The local path of a `share` reference on this node (copied into its cache once); anything else as it is."""
        if reference is None or not reference.startswith(SHARED_PREFIX):
            return reference
        return str(self.local_copy(reference.removeprefix(SHARED_PREFIX)))

    def location(self, relative: str) -> str:
        """Where `relative` is, as a user finds it: a local path, or a URI on an object store."""
        return self.path(relative) if self.is_local else f"{self.uri.split('://', 1)[0]}://{self.path(relative)}"

    def child_uri(self, relative: str) -> str:
        """The URI of a workspace nested at `relative` (its filesystem options kept)."""
        if self.is_local:
            return self.path(relative)
        query = f"?{self.uri.split('?', 1)[1]}" if "?" in self.uri else ""
        return f"{self.location(relative)}{query}"

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self.path(relative)) as handle:
            return handle.read().decode("utf-8")

    def write_text(self, relative: str, text: str) -> None:
        """Write a small text file (a record, a manifest) whole (`_put`)."""
        self._put(self.path(relative), lambda sink: sink.write(text.encode("utf-8")))

    def _put(self, target: str, write: Callable[[pa.NativeFile], object]) -> None:
        """Write the file `target` (a full path) whole with `write`: on an object store an upload appears only once
        complete (and closing it raises a failure); on a filesystem through a hidden temporary name and a rename.
        A failed write leaves nothing under `target`."""
        folder, name = target.rsplit("/", 1)
        staged = target if not self.is_local else f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.storage(target):
                self.fs.create_dir(folder, recursive=True)
                with self.fs.open_output_stream(staged) as sink:
                    write(sink)
                if staged != target:
                    self.fs.move(staged, target)
        except BaseException:
            if staged != target:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(staged)
            raise

    @contextlib.contextmanager
    def storage(self, target: str) -> Iterator[None]:
        """Turn a failed write of `target` (a full path) into a StorageError naming it and the fix: a full disk, a
        read-only workspace, or a workspace that is gone (deleted or unmounted: a local root is never re-created)."""
        if self.is_local and not os.path.isdir(self.root):
            raise StorageError(self._storage_message(errno.ENOENT, target))
        try:
            yield
        except OSError as error:
            code = error.errno if error.errno in STORAGE_ERRNOS else _errno_in(str(error))
            if code is None:
                raise
            raise StorageError(self._storage_message(code, target)) from error

    def _storage_message(self, code: int, target: str) -> str:
        where = target if self.is_local else f"{self.uri.split('://', 1)[0]}://{target}"
        again = ("then run the same command again: it resumes from what was committed, and nothing half-written "
                 "was kept")
        if code in (errno.ENOSPC, errno.EDQUOT):
            return (f"no space left on the device holding the workspace, writing {where}: free space there (see "
                    f"`df -h {self.root}`) or set a workspace on a larger disk, {again}")
        if code == errno.ENOENT:
            return (f"the workspace {self.location('')} is gone (deleted or unmounted) while writing {where}: mount "
                    f"it again, or set another workspace, {again}")
        return (f"the workspace {self.location('')} cannot be written ({os.strerror(code).lower()}), writing {where}: "
                f"make it writable for this user or set another workspace, {again}")

    @contextlib.contextmanager
    def reading(self, relative: str) -> Iterator[None]:
        """Turn an unreadable Parquet table (truncated, corrupt) into a CorruptTableError naming it and the fix."""
        try:
            yield
        except (pa.ArrowInvalid, OSError) as error:
            if isinstance(error, FileNotFoundError) or (isinstance(error, OSError) and error.errno is not None):
                raise
            raise CorruptTableError(f"the workspace table {self.location(relative)} cannot be read ({error}): it is "
                                    f"damaged (truncated or corrupt). {rebuild_hint(relative)}") from error

    def _download(self, path: str, local: Path) -> None:
        """Copy the workspace file at the full path `path` to the local file `local`."""
        with self.fs.open_input_stream(path) as source, open(local, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 24)

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        if not self.exists(relative):
            raise FileNotFoundError(
                f"table {relative!r} not found in workspace {self.uri}; run the stage that writes it first"
            )
        with self.reading(relative):
            return pq.read_table(self.path(relative), columns=columns, filesystem=self.fs)

    def row_count(self, relative: str) -> int:
        """Rows of a Parquet table, read from its footer."""
        with self.reading(relative), self.fs.open_input_file(self.path(relative)) as handle:
            return pq.read_metadata(handle).num_rows

    def table_identity(self, relative: str) -> object:
        """What identifies a table's content for the stages that read it: an ingested input by its source, a
        translate view by what it was made from, a score table by its inputs, anything else by its size and time."""
        metadata = self.file_metadata(relative)
        for key in ("td_ray_source", "td_ray_view", "td_ray_inputs"):
            if key in metadata:
                return [key, metadata[key]]
        info = self.fs.get_file_info(self.path(relative))
        return [info.size, info.mtime_ns]

    def file_metadata(self, relative: str) -> dict[str, str]:
        """The key-value pairs in a Parquet file's footer (as written by `atomic_writer(metadata=...)`)."""
        with self.reading(relative), self.fs.open_input_file(self.path(relative)) as handle:
            pairs = pq.read_metadata(handle).metadata or {}
        return {key.decode(): value.decode() for key, value in pairs.items() if key != b"ARROW:schema"}

    def read_schema(self, relative: str) -> pa.Schema:
        if not self.exists(relative):
            raise FileNotFoundError(
                f"table {relative!r} not found in workspace {self.uri}; run the stage that writes it first"
            )
        with self.reading(relative):
            return pq.read_schema(self.path(relative), filesystem=self.fs)

    def iter_batches(self, relative: str, columns: list[str] | None = None,
                     batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream a table's `columns` in record batches, never holding the whole table."""
        with self.reading(relative), self.fs.open_input_file(self.path(relative)) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns)

    def key_batches(self, relative: str, columns: list[str]) -> KeyBatches:
        """A re-readable stream of a table's key `columns` (for exactly-once checks)."""
        return lambda: self.iter_batches(relative, columns)

    @contextlib.contextmanager
    def atomic_writer(self, relative: str, schema: pa.Schema,
                      validate: Callable[[Callable[[list[str]], Iterator[pa.RecordBatch]]], None] | None = None,
                      metadata: Callable[[], dict[str, str]] | None = None) -> Iterator[pq.ParquetWriter]:
        """A ParquetWriter whose file appears under `relative` only if the block exits cleanly.

        `validate`, if given, is called with a function that streams columns of the finished file, before the
        rename commits it. `metadata`, if given, is called once all rows are written; its pairs go in the
        file's footer (read back with `file_metadata`).
        """
        target = self.path(relative)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.storage(target):
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            writer = pq.ParquetWriter(temporary, schema, filesystem=self.fs)

        def read(columns: list[str]) -> Iterator[pa.RecordBatch]:
            with self.fs.open_input_file(temporary) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65_536, columns=columns)

        try:
            with self.storage(target):
                yield writer
                if metadata is not None:
                    writer.add_key_value_metadata(metadata())
                writer.close()
            if validate is not None:
                validate(read)
            with self.storage(target):
                self._commit(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk can fail the close too; the temporary goes either way
                writer.close()
            with contextlib.suppress(OSError):
                self.fs.delete_file(temporary)
            raise

    def _commit(self, temporary: str, target: str) -> None:
        """Give a finished temporary file its final name: a rename on a filesystem; on an object store a copy made by
        the server (S3 copies at most 5 GiB in one request) or, above SERVER_COPY_LIMIT, streamed through this process
        into a new upload; either appears under `target` only once complete."""
        if self.is_local or self.fs.get_file_info(temporary).size <= SERVER_COPY_LIMIT:
            self.fs.move(temporary, target)
            return
        with self.fs.open_input_stream(temporary) as source, self.fs.open_output_stream(target) as sink:
            shutil.copyfileobj(source, sink, 1 << 26)
        self.fs.delete_file(temporary)

    @contextlib.contextmanager
    def exactly_once_writer(self, relative: str, schema: pa.Schema, keys: list[str],
                            expected: KeyBatches | None = None,
                            metadata: Callable[[], dict[str, str]] | None = None,
                            select: Callable[[pa.Table], pa.Table] | None = None) -> Iterator[KeyedWriter]:
        """An atomic writer that commits only if each `keys` value was written once and, when `expected` (a
        stream of the key columns that must come out) is given, exactly those. `select` picks the rows whose keys
        are checked (e.g. each document's first passage). Memory: none with `expected` (digests), one uint64 a
        row without it. On failure the error names example keys and nothing is committed."""
        checked = KeyedWriter(schema, keys, collect=expected is None, select=select)

        def validate(read: Callable[[list[str]], Iterator[pa.RecordBatch]]) -> None:
            columns = list(dict.fromkeys(keys + (schema.names if select else [])))
            checked.check(expected, lambda: (checked.checked_keys(batch) for batch in read(columns)), relative)

        with self.atomic_writer(relative, schema, validate=validate, metadata=metadata) as writer:
            checked.writer = writer
            yield checked

    def commit_block(self, directory: str, table: pa.Table, schema: pa.Schema, keys: list[str],
                     lease: str | None = None) -> str:
        """Write one block of a block store atomically into `directory`; returns its file name.

        The name is a hash of the block's keys, so a retried task rewrites the same file instead of adding a twin. The
        block is encoded first, then written whole (`_put`). `lease`: the token of the stage lease the writer works
        under (`check_holder`).
        """
        check_holder(self, directory.split("/", 1)[0], lease)  # a worker whose run is gone commits nothing more
        table = table.select(schema.names).cast(schema)
        digest = hashlib.sha256("\n".join("\t".join(map(str, key)) for key in
                                           zip(*(table[name].to_pylist() for name in keys))).encode())
        name = f"part-{digest.hexdigest()[:20]}.parquet"
        encoded = pa.BufferOutputStream()
        pq.write_table(table, encoded)
        self._put(self.path(f"{directory}/{name}"), lambda sink: sink.write(encoded.getvalue()))
        return name

    def block_names(self, directory: str) -> list[str]:
        """The committed block files of a block store directory."""
        if not self.exists(directory):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(directory)))
        return [info.base_name for info in infos if info.base_name.startswith("part-")]

    def remove_temporaries(self, *relatives: str, live_since: float | None = None) -> int:
        """Delete the temporary files killed writers left under `relatives`; returns how many. Called at the start of
        each stage, under its lease. `live_since`: the start of the earliest other run still alive on the workspace;
        a temporary written since then may be that run's, and is kept."""
        removed = 0
        for relative in relatives:
            if not self.exists(relative):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(relative), recursive=True)):
                if info.type == pafs.FileType.File and _TEMPORARY.search(info.base_name) and (
                        live_since is None or (info.mtime_ns or 0) / 1e9 < live_since):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.delete_file(info.path)
                    removed += 1
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run under %s", removed, relatives)
        return removed

    def write_table(self, table: pa.Table, relative: str, schema: pa.Schema | None = None,
                    metadata: dict[str, str] | None = None) -> str:
        """Write one table atomically; cast to `schema` first so every writer agrees on types. `metadata` goes
        in the file's footer."""
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        with self.atomic_writer(relative, table.schema, metadata=(lambda: metadata) if metadata else None) as writer:
            writer.write_table(table)
        return self.path(relative)


class Mirror:
    """A workspace folder whose files a task reads and writes on its own node's disk (FAISS and mapped arrays need
    local files): the folder itself on a local workspace, where `fetch` and `commit` do nothing; on an object store a
    node-local copy, into which `fetch` downloads the files a task reads (again only when the stored object changed)
    and from which `commit` uploads the files it wrote. Each file has one writer, so no two nodes write one file."""

    def __init__(self, workspace: Workspace, relative: str):
        self.workspace, self.relative = workspace, relative
        self.folder = Path(workspace.path(relative)) if workspace.is_local else workspace.local_dir(relative)

    def fetch(self, *names: str) -> Path:
        """The local folder, holding the current version of each of `names`."""
        if self.workspace.is_local:
            return self.folder
        for name in names:
            info = self.workspace.fs.get_file_info(self.workspace.path(f"{self.relative}/{name}"))
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.workspace.location(f'{self.relative}/{name}')} not found")
            version, marker = f"{info.size}:{info.mtime_ns}", self.folder / f".{name}.version"
            if (self.folder / name).is_file() and marker.is_file() and marker.read_text() == version:
                continue
            with node_lock(f"mirror-{hashlib.sha256(str(self.folder / name).encode()).hexdigest()[:16]}"):
                staged = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.download"
                self.workspace._download(info.path, staged)
                os.replace(staged, self.folder / name)
                marker.write_text(version)
        return self.folder

    def commit(self, *names: str) -> None:
        """Upload `names` from the local folder (each appears whole, under its final name)."""
        if self.workspace.is_local:
            return
        for name in names:
            self.workspace.upload(self.folder / name, f"{self.relative}/{name}")
            info = self.workspace.fs.get_file_info(self.workspace.path(f"{self.relative}/{name}"))
            (self.folder / f".{name}.version").write_text(f"{info.size}:{info.mtime_ns}")

    def remove(self, *names: str) -> None:
        """Delete `names` from the workspace folder and from this node's copy."""
        for name in names:
            if self.workspace.exists(f"{self.relative}/{name}"):
                self.workspace.fs.delete_file(self.workspace.path(f"{self.relative}/{name}"))
            (self.folder / name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Empty the folder, in the workspace and in this node's copy (an interrupted build of the same key)."""
        if self.workspace.exists(self.relative):
            self.workspace.fs.delete_dir_contents(self.workspace.path(self.relative))
        if not self.workspace.is_local:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def size(self, name: str) -> int:
        return self.workspace.fs.get_file_info(self.workspace.path(f"{self.relative}/{name}")).size


class KeyedWriter:
    """Writes batches cast to one schema, keeping a digest of their keys for the exactly-once check."""

    def __init__(self, schema: pa.Schema, keys: list[str], collect: bool,
                 select: Callable[[pa.Table], pa.Table] | None = None):
        self.schema, self.keys, self.select = schema, keys, select
        self.rows = 0
        self.digest = Digest()
        self.hashes: list[np.ndarray] | None = [] if collect else None
        self.writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.Table | pa.RecordBatch, row_group_size: int | None = None) -> None:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = batch.select(self.schema.names).cast(self.schema)
        hashes = key_hashes(self.checked_keys(batch))
        self.rows += batch.num_rows
        self.digest.add(hashes)
        if self.hashes is not None:
            self.hashes.append(hashes)
        self.writer.write_table(batch, row_group_size=row_group_size)
        if batch.num_rows:
            mark_first_row()

    def checked_keys(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        """The key columns of the rows the check covers."""
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        return (self.select(table) if self.select else table).select(self.keys)

    def check(self, expected: KeyBatches | None, written: KeyBatches, name: str) -> None:
        """Raise ExactlyOnceError, naming example keys, unless the written keys are right."""
        if expected is not None:
            wanted = Digest.of(expected())
            if wanted == self.digest:
                return
            rows = max(wanted.rows, self.digest.rows)
        elif not len(repeated_hashes(iter(self.hashes))):
            return
        else:
            rows = self.digest.rows
        found = describe_differences(expected, written, rows)
        if expected is None and not found["repeated"]:
            return  # two keys shared a hash; none repeats
        raise ExactlyOnceError(
            f"{name}: the output does not hold each input key exactly once ({self.digest.rows} rows written"
            + (f" for {wanted.rows} expected" if expected is not None else "") + f"): missing {found['missing']}, "
            f"repeated {found['repeated']}, unexpected {found['unexpected']}; nothing was committed. Run the stage "
            "again; if it repeats, its inputs changed while it ran"
        )


def _errno_in(message: str) -> int | None:
    """The storage errno pyarrow names only in its message ("... [errno 28] No space left on device").

    >>> _errno_in("Error writing bytes to file. Detail: [errno 28] No space left on device")
    28
    >>> _errno_in("Invalid page header") is None
    True
    """
    found = re.search(r"\[errno (\d+)\]", message)
    return int(found.group(1)) if found and int(found.group(1)) in STORAGE_ERRNOS else None


def rebuild_hint(relative: str) -> str:
    """How a damaged workspace table is made again: an ingested input from its source, a stage's output by its stage.

    >>> rebuild_hint("inputs/eval_docs.parquet")
    'It is an ingested copy of a data source: the next run of any stage reads the source again into it'
    >>> rebuild_hint("score/scores.parquet")
    'Run `td-ray score --config <your config>` again: it finds the table damaged and rebuilds it'
    """
    if relative.startswith("inputs/"):
        return "It is an ingested copy of a data source: the next run of any stage reads the source again into it"
    if relative.startswith("text/"):
        return "It is a text lookup exported from a table: delete it, and the next stage that reads it exports it again"
    stage = relative.split("/", 1)[0]
    return f"Run `td-ray {stage} --config <your config>` again: it finds the table damaged and rebuilds it"


_TEMPORARY = re.compile(r"(\.tmp-[0-9a-f]{8}$)|(^\..+\.tmp(\.npy)?$)")
"""Names of files a killed writer can leave: `<target>.tmp-<8 hex>` (tables), `.<name>.<8 hex>.tmp` (whole files),
`.<name>.<pid>.tmp.npy` (a text lookup's index)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a local text file through a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# Where each stage's tables live, relative to the workspace root: the one place that names them.
PASSAGES_EN = "inputs/passages.parquet"
TRAIN_QUERIES_EN = "inputs/train_queries.parquet"
CANDIDATES = "inputs/candidates.parquet"
EVAL_DOCS = "inputs/eval_docs.parquet"
EVAL_TOPICS = "inputs/eval_topics.parquet"
EVAL_QRELS = "inputs/eval_qrels.parquet"
TRAIN_QRELS = "inputs/train_qrels.parquet"
SCORES = "score/scores.parquet"
STUDENT_DIR = "distill/student"
EMBEDDINGS = "index/embeddings.parquet"
INDEX_META = "index/index_meta.json"
RUN = "evaluate/run.parquet"
RUN_TREC = "evaluate/run.trec"
PER_QUERY = "evaluate/per_query.parquet"
UNTRAINED = "untrained"
"""Folder, inside the workspace, of the untrained student's index and evaluation (the pipeline's
`compare_untrained`), itself a workspace."""


def untrained_label(stage: str) -> str:
    """The name of the untrained student's `stage` (index or evaluate) in the summary, MLflow and the report."""
    return f"{stage} ({UNTRAINED})"


def translated(kind: str, lang: str) -> str:
    """The translate stage's table of `kind` (passages or queries) in `lang`; English is the ingested input."""
    if lang == "en":
        return PASSAGES_EN if kind == "passages" else TRAIN_QUERIES_EN
    return f"translate/{kind}.{lang}.parquet"
