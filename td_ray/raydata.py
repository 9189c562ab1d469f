"""Thin helpers over Ray Data shared by the stages: actor pools and streaming, atomic, exactly-once output."""
from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from td_ray.config import ActorPoolConfig
from td_ray.errors import TdRayError
from td_ray.keys import KeyBatches
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)


def read_table_dataset(workspace: Workspace, relative: str, rows_per_block: int | None = None):
    """A Ray Dataset over a workspace Parquet table. With `rows_per_block`, its blocks are cut (streaming, no
    shuffle) to at most that many rows: a table read as a few large blocks otherwise feeds one actor of a pool
    while the others wait, since an actor takes a whole block per task."""
    import ray.data

    # An actor's own error (a full disk, a td-ray error) reaches the driver as itself: wrapped in Ray Data's
    # UserCodeException it crossed as text, and the CLI could not name the file and the fix.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    dataset = ray.data.read_parquet(workspace.path(relative), filesystem=workspace.fs)
    return dataset.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else dataset


def actor_map_args(pool: ActorPoolConfig, calls_per_actor: int = 1) -> dict:
    """`map_batches` arguments for a callable-class stage: a pool of actors (fixed, or autoscaling between
    num_actors and max_actors), each loading its model once and running `calls_per_actor` calls at once (above 1,
    in threads: for a thread-safe engine that queues work, such as a CTranslate2 translator)."""
    import ray.data

    sizes = ({"size": pool.num_actors} if pool.max_actors is None
             else {"min_size": pool.num_actors, "max_size": pool.max_actors})
    threads = ({"max_concurrent_calls_per_actor": calls_per_actor, "enable_true_multi_threading": True}
               if calls_per_actor > 1 else {})
    strategy = ray.data.ActorPoolStrategy(**sizes, **threads)
    arguments = {"compute": strategy, "num_cpus": pool.num_cpus_per_actor,
                 "batch_size": pool.batch_size}
    if pool.num_gpus_per_actor:
        arguments["num_gpus"] = pool.num_gpus_per_actor
    return arguments


READ_CPUS = 1.0
"""CPUs a stage's pools must leave free on a cluster: Ray Data's read tasks reserve one each to stream the input."""


def check_read_room(what: str, reserved: float, fix: str, joined: bool) -> None:
    """Stop before the work when a stage's pools (`what`, `reserved` CPUs in all) would leave a local cluster (`joined`
    False) less than a read task's CPU: the input could never be read, and the stage would wait forever. On a joined
    cluster, which may autoscale, only warn."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    left = total - reserved
    if left < READ_CPUS:
        message = (f"{what} leave {left:g} of the cluster's {total:g} CPUs free, but Ray Data needs {READ_CPUS:g} to "
                   f"stream the input; {fix}")
        if not joined:
            raise ValueError(message)
        logger.warning("%s (continuing: an autoscaling cluster may add CPUs)", message)


def steady_pace(finished: list[tuple[float, int]]) -> float:
    """Rows a second from the first output's end to the last's, given each output's (end time, rows): start-up is
    not pace.

    >>> steady_pace([(10.0, 4096), (12.0, 4096), (14.0, 4096), (15.0, 1000)])
    1838.4
    >>> steady_pace([(10.0, 4096)])
    0.0
    """
    if len(finished) < 2:
        return 0.0
    ordered = sorted(finished)
    seconds = ordered[-1][0] - ordered[0][0]
    return sum(rows for _, rows in ordered[1:]) / seconds if seconds > 0 else 0.0


def write_stream(dataset, workspace: Workspace, relative: str, schema: pa.Schema, keys: list[str],
                 expected: KeyBatches | None = None, transform: Callable[[pa.Table], pa.Table] | None = None,
                 metadata: dict[str, str] | Callable[[], dict[str, str]] | None = None) -> int:
    """Stream `dataset` into one Parquet table, committed only if each key appears exactly once.

    `expected` (a re-readable stream of the key columns) must then match the output's keys exactly; it is
    compared by digest, so no process holds the keys. `transform` sees each batch with all its columns (to
    count, or to add columns) before it is cut to `schema`. `metadata` (or what it returns, called once every row
is written) goes in the file's footer.
    """
    with workspace.exactly_once_writer(relative, schema, keys, expected,
                                       metadata=metadata if callable(metadata) or metadata is None
                                       else lambda: metadata) as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if transform is not None:
                batch = transform(batch)
            writer.write(batch)
    return writer.rows


def sum_column(batch: pa.Table, column: str) -> float:
    return float(pc.sum(batch[column]).as_py() or 0)


def in_task(function: Callable, *args, num_cpus: float = 0.5, num_gpus: float = 0, **kwargs):
    """Run `function` in one Ray task and return its result, so work whose memory grows with the data (an
    export, an id check over the collection) never grows the driver. A td-ray error raised there is raised
    here as itself, with its own message."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(function).remote(*args, **kwargs))
    except RayTaskError as error:
        if isinstance(error.cause, TdRayError):
            raise error.cause from None
        raise
