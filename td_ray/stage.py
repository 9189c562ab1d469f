"""One runner for every stage: a `Stage` states what it ingests, the tables it reads, its key and its work; `run_stage`
owns the rest (timing, the MLflow run, temporaries, ingest, input checks, "unchanged" and the `StageResult`).

"Unchanged" is decided one way: the runner keeps a record of each finished stage, ``stages/<name>.json``, written
atomically through the workspace's filesystem, with the key the stage was run for and what it produced. A run whose
key equals the record's, with the record's outputs still in place, does no work and says so. A stage that is
incremental inside (translate per language, by parts) keeps its parts' keys in the same record.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow.fs as pafs
from pydantic import BaseModel

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig
from td_ray.errors import CorruptTableError
from td_ray.lease import StageLease, live_holders
from td_ray.result import StageResult
from td_ray.sources import DataSource, Role, ingest
from td_ray.workspace import CANDIDATES, Workspace

logger = logging.getLogger(__name__)

RECORDS = "stages"
"""Folder of the runner's records, one JSON file a stage."""


@dataclass(frozen=True)
class Source:
    """A data source the stage ingests before it reads anything: into ``inputs/<name>.parquet``."""

    config: DataSource
    role: Role
    name: str
    field: str | None = None
    """The config field named in errors (default ``data.<name>``)."""
    within: tuple[str, str] | None = None
    """(table, column): keep only the ids that column of that ingested table holds (`training_sources`)."""


def training_sources(config: PipelineConfig) -> list[Source]:
    """The English training inputs: passages, training queries and candidates. With `data.candidates.limit` the
    candidates come first and pick the queries; the passages and training queries are then read only for them, so a
    small real run translates and scores only what it trains on."""
    data = config.data
    if data.candidates.limit is None:
        return [Source(data.passages, "docs", "passages"), Source(data.train_queries, "queries", "train_queries"),
                Source(data.candidates, "candidates", "candidates")]
    return [Source(data.candidates, "candidates", "candidates"),
            Source(data.passages, "docs", "passages", within=(CANDIDATES, "pid")),
            Source(data.train_queries, "queries", "train_queries", within=(CANDIDATES, "qid"))]


@dataclass
class Outcome:
    """What a stage's work produced: rows, where its outputs are (workspace-relative), metrics, and the parts'
    keys of an incremental stage. `key` replaces the key the work started from when the work itself changes what
    the next run will compute (translate's block store)."""

    rows: int
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """Anything else the stage keeps for its next run (e.g. the registered model version)."""


@dataclass
class StageContext:
    """What a stage's work is given: the workspace, its own config section (and the others it declared), the run."""

    name: str
    workspace: Workspace
    options: Any
    run_id: str | None
    previous: dict[str, Any]
    """The stage's last record (empty if none): its parts' keys let an incremental stage skip what is unchanged."""
    _sections: dict[str, BaseModel]
    _ray: Callable[[], None]
    tracking_uri: str
    config_hash: str
    """The whole config's fingerprint, for lineage tags."""
    memo: dict[str, Any] = field(default_factory=dict)
    """What the stage's `key` computed that its `work` reuses in the same run (translate's parts)."""
    lease: str | None = None
    """The token of the stage's lease: its actors commit only while this run holds it (`check_holder`)."""

    def section(self, name: str) -> Any:
        """Another config section the stage declared in `Stage.sections`."""
        if name not in self._sections:
            raise KeyError(f"stage {self.name} reads config section {name!r} without declaring it in its sections")
        return self._sections[name]

    def ray(self) -> None:
        """Start or join Ray (lazily: an unchanged stage never starts it)."""
        self._ray()

    def unchanged_part(self, part: str, key: str, output: str) -> bool:
        """Whether the part was last made from `key` and its output table is still in place."""
        return self.previous.get("parts", {}).get(part) == key and self.workspace.exists(output)


class Stage:
    """A stage: subclasses set `name` and `sections`, and implement `key` and `work`."""

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]] = ()
    """The config sections the stage reads besides its own."""
    temporaries: ClassVar[tuple[str, ...]] = ("inputs",)
    """Workspace folders where a killed run of this stage may have left temporary files."""
    artifacts: ClassVar[tuple[str, ...]] = ()
    """Outputs logged as MLflow artifacts, whether made or reused."""
    scratch: ClassVar[tuple[str, ...]] = ()
    """Folders of per-key work that an unfinished run leaves (score's blocks), removed when the stage finishes: a run
    for another key, crashed or abandoned, leaves nothing behind for good."""

    def check(self, options: Any) -> None:
        """Fail before any work or run starts (a missing teacher, a bad measure name)."""

    def sources(self, config: PipelineConfig) -> list[Source]:
        """The data sources to ingest."""
        return []

    def reads(self, context: StageContext) -> list[tuple[str, tuple[str, ...]]]:
        """The workspace tables the work reads, with the columns each must have."""
        return []

    def key(self, context: StageContext) -> str:
        """What the output depends on; an unchanged key with the outputs in place skips the work."""
        raise NotImplementedError

    def reusable(self, context: StageContext, record: dict[str, Any]) -> bool:
        """Whether a recorded result with the same key can stand (beyond its outputs being in place)."""
        return True

    def work(self, context: StageContext, key: str) -> Outcome:
        raise NotImplementedError


def record_path(name: str) -> str:
    return f"{RECORDS}/{name}.json"


def read_record(workspace: Workspace, name: str) -> dict[str, Any]:
    """The stage's last record, or {} when it never finished here."""
    return json.loads(workspace.read_text(record_path(name))) if workspace.exists(record_path(name)) else {}


def run_stage(stage: Stage, config: PipelineConfig) -> StageResult:
    """Run `stage` on `config`: check, ingest, check the inputs, then reuse its last result or do its work."""
    started = time.perf_counter()
    options = getattr(config, stage.name)
    stage.check(options)
    workspace = Workspace(config.workspace)
    with StageLease(workspace, stage.name) as lease, tracking.stage_run(config, stage.name) as run:
        run_id = run.run_id
        previous = read_record(workspace, stage.name)
        context = StageContext(stage.name, workspace, options, run_id, previous,
                               {name: getattr(config, name) for name in stage.sections},
                               lambda: _join_ray(config, workspace), tracking.tracking_uri(config),
                               config.fingerprint(), lease=lease.holder.token)
        _remove_temporaries(stage, workspace, lease)
        for source in stage.sources(config):
            table = ingest(workspace, source.config, source.role, source.name, source.field, source.within)
            tracking.log_input(source.config, source.name, source.role,
                               workspace.file_metadata(table).get("td_ray_source", ""))
        for table, columns in stage.reads(context):
            schemas.require_columns(workspace.read_schema(table), columns, table)
        key = stage.key(context)
        if previous.get("key") == key and _in_place(workspace, previous) and stage.reusable(context, previous):
            result = StageResult(stage.name, previous["rows"], time.perf_counter() - started,
                                 _paths(workspace, previous["outputs"]), previous["metrics"] | {"unchanged": 1.0},
                                 run_id)
            logger.info("%s: unchanged since run %s (same inputs and settings); its outputs are reused", stage.name,
                        previous.get("run_id"))
        else:
            outcome = stage.work(context, key)
            record = {"key": outcome.key or key, "rows": outcome.rows, "outputs": outcome.outputs,
                      "metrics": outcome.metrics, "parts": outcome.parts, "run_id": run_id} | outcome.record
            workspace.write_text(record_path(stage.name), json.dumps(record, indent=1) + "\n")
            result = StageResult(stage.name, outcome.rows, time.perf_counter() - started,
                                 _paths(workspace, outcome.outputs), outcome.metrics, run_id)
        for folder in stage.scratch:
            if workspace.exists(folder):
                workspace.fs.delete_dir(workspace.path(folder))
        tracking.log_result(result)
        for name in stage.artifacts:
            tracking.log_workspace_artifact(workspace, result.outputs[name])
    result.usage, result.currency = run.usage, config.cost.currency
    logger.info(result.summary())
    return result


def _join_ray(config: PipelineConfig, workspace: Workspace) -> None:
    from td_ray.ray_session import check_every_node_sees, ensure_ray

    ensure_ray(config.ray)
    check_every_node_sees(workspace)


def _remove_temporaries(stage: Stage, workspace: Workspace, lease: StageLease) -> None:
    """Delete what killed writers left: everything in the stage's own folder (its lease says no other run of it is
    alive); in shared folders (inputs, text) only what was written before every other live run started."""
    others = [holder.since for holder in live_holders(workspace) if holder.token != lease.holder.token]
    for folder in stage.temporaries:
        workspace.remove_temporaries(folder, live_since=None if folder == stage.name else min(others, default=None))


def _in_place(workspace: Workspace, record: dict[str, Any]) -> bool:
    """Whether a record's outputs are all there, its tables readable (a damaged one makes the stage run again)."""
    for relative in record.get("outputs", {}).values():
        if workspace.fs.get_file_info(workspace.path(relative)).type == pafs.FileType.NotFound:
            return False
        if relative.endswith(".parquet"):
            try:
                workspace.file_metadata(relative)
            except CorruptTableError as error:
                logger.warning("%s; the stage runs again to rebuild it", error)
                return False
    return True


def _paths(workspace: Workspace, outputs: dict[str, str]) -> dict[str, str]:
    """Workspace-relative outputs as the user finds them: full paths, or URIs on an object store."""
    return {name: workspace.location(relative) for name, relative in outputs.items()}
