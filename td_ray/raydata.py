"""Thin helpers over Ray Data shared by the stages: actor pools and streaming, atomic, exactly-once output."""
from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from td_ray.config import ActorPoolConfig
from td_ray.errors import TdRayError
from td_ray.sources import find_duplicates
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)


class ExactlyOnceError(TdRayError):
    """A stage's output does not hold each input key exactly once; nothing was committed."""


def read_table_dataset(workspace: Workspace, relative: str):
    """A Ray Dataset over a workspace Parquet table."""
    import ray.data

    return ray.data.read_parquet(workspace.path(relative), filesystem=workspace.fs)


def actor_map_args(pool: ActorPoolConfig) -> dict:
    """`map_batches` arguments for a callable-class stage: a pool of actors (fixed, or autoscaling between
    num_actors and max_actors), each loading its model once."""
    import ray.data

    if pool.max_actors is None:
        strategy = ray.data.ActorPoolStrategy(size=pool.num_actors)
    else:
        strategy = ray.data.ActorPoolStrategy(min_size=pool.num_actors, max_size=pool.max_actors)
    arguments = {"compute": strategy, "num_cpus": pool.num_cpus_per_actor,
                 "batch_size": pool.batch_size}
    if pool.num_gpus_per_actor:
        arguments["num_gpus"] = pool.num_gpus_per_actor
    return arguments


def write_stream(dataset, workspace: Workspace, relative: str, schema: pa.Schema, keys: list[str],
                 expected: pa.Table | None = None, transform: Callable[[pa.Table], pa.Table] | None = None,
                 metadata: dict[str, str] | None = None) -> int:
    """Stream `dataset` into one Parquet table, committed only if each key appears exactly once.

    `expected` (a table of the key columns) must then match the output's keys exactly. `transform` sees each
    batch with all its columns (to count, or to add columns) before it is cut to `schema`. `metadata` goes in
    the file's footer.
    """
    rows = 0

    def validate(written: pa.Table) -> None:
        check_exactly_once(written, keys, expected, relative)

    with workspace.atomic_writer(relative, schema, validate=validate, validate_columns=keys,
                                 metadata=(lambda: metadata) if metadata else None) as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if transform is not None:
                batch = transform(batch)
            writer.write_table(batch.select(schema.names).cast(schema))
            rows += batch.num_rows
    return rows


def check_exactly_once(written: pa.Table, keys: list[str], expected: pa.Table | None, name: str) -> None:
    """Raise unless `written` holds each key once and, if given, exactly the keys of `expected`."""
    duplicates = find_duplicates(written, keys)
    if duplicates:
        raise ExactlyOnceError(f"{name}: keys written more than once, e.g. {duplicates}")
    if expected is None:
        return
    missing = expected.join(written, keys, join_type="left anti")
    extra = written.join(expected, keys, join_type="left anti")
    if missing.num_rows or extra.num_rows:
        raise ExactlyOnceError(
            f"{name}: {missing.num_rows} input key(s) missing from the output (e.g. "
            f"{missing.slice(0, 3).to_pylist()}) and {extra.num_rows} unexpected"
        )


def sum_column(batch: pa.Table, column: str) -> float:
    return float(pc.sum(batch[column]).as_py() or 0)
