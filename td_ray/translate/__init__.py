"""translate: English passages and queries into each target language, through CTranslate2 actors on Ray Data.

Incremental and resumable (see `store`): rows are keyed by (id, lang, MT model, source text hash) and committed
per block by the actors, so only what is missing is translated. A target may instead be read from a
pre-translated collection (e.g. neuMARCO). Either way the stage writes ``translate/<kind>.<lang>.parquet``,
one row per input id, each checked for quality (`quality`) and flagged, never dropped.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig, TranslateTarget
from td_ray.fingerprint import digest
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, in_task, read_table_dataset, write_stream
from td_ray.result import StageResult
from td_ray.sources import SourceError, ingest
from td_ray.textjoin import export_text
from td_ray.translate import store
from td_ray.translate.actor import (
    INPUT_COLUMNS,
    CT2TranslatorActor,
    PretranslatedCheckActor,
    plan_task,
    view_task,
)
from td_ray.translate.core import SentencePieceCodec, resolve_ct2_model
from td_ray.translate.quality import flag_names
from td_ray.workspace import PASSAGES_EN, TRAIN_QUERIES_EN, Workspace, translated

logger = logging.getLogger(__name__)

__all__ = ["CT2TranslatorActor", "run"]

ENGLISH = {"passages": PASSAGES_EN, "queries": TRAIN_QUERIES_EN}


class _Totals:
    """Counters summed over every block of the run, and per actor."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.flags: Counter = Counter()
        self.actor_tokens: Counter = Counter()
        self.actor_seconds: Counter = Counter()
        self.seconds = 0.0

    def add_block(self, row: dict) -> None:
        for name in ("rows", "segments", "source_tokens", "target_tokens", "positions", "retried"):
            self.counts[name] += int(row[name])
        self.counts["blocks"] += 1
        self.flags.update(json.loads(row["flags"]))
        self.actor_tokens[row["actor"]] += int(row["target_tokens"])
        self.actor_seconds[row["actor"]] += float(row["seconds"])

    def metrics(self) -> dict[str, float]:
        counts = self.counts
        metrics = {f"translated_{name}": float(counts[name]) for name in
                   ("rows", "blocks", "segments", "source_tokens", "target_tokens", "retried")}
        metrics["tokens_per_s"] = counts["target_tokens"] / self.seconds if self.seconds else 0.0
        metrics["padding_ratio"] = 1 - counts["source_tokens"] / counts["positions"] if counts["positions"] else 0.0
        metrics["translate_seconds"] = self.seconds
        metrics |= {f"flags_{name}": float(count) for name, count in self.flags.items()}
        return metrics


def _check_models(config: PipelineConfig, workspace: Workspace) -> dict[str, Path]:
    """Resolve and open every MT model on the driver, so a bad model or prefix fails before any actor starts."""
    model_dirs = {}
    for target in config.translate.targets:
        if target.model is not None:
            model_dirs[target.lang] = resolve_ct2_model(target.model, workspace.local_dir("models/ct2"))
            SentencePieceCodec(model_dirs[target.lang], target.source_prefix, target.target_prefix)
    return model_dirs


def _unchanged(workspace: Workspace, relative: str, key: str) -> bool:
    return workspace.exists(relative) and workspace.file_metadata(relative).get("td_ray_view") == key


def _translate_missing(config: PipelineConfig, workspace: Workspace, kind: str, target: TranslateTarget,
                       model_dir: Path, totals: _Totals) -> dict:
    """Translate the rows of (kind, target) that the store lacks; write the view; return the manifest entry.

    The view records what it was made from (the input, the model version and settings, the committed blocks):
    when all of that is unchanged the stage reads nothing more and says so.
    """
    slug = store.model_slug(target, model_dir, config.translate)
    directory = store.store_dir(kind, target.lang, slug)
    relative = translated(kind, target.lang)
    english = ENGLISH[kind]
    entry = {"kind": kind, "lang": target.lang, "mt_model": target.model, "store": workspace.path(directory)}
    if _unchanged(workspace, relative, _view_key(workspace, english, slug, directory)):
        rows = workspace.row_count(relative)
        logger.info("translate %s -> %s: unchanged (input, model, settings and store), %d rows reused from %s",
                    kind, target.lang, rows, workspace.path(relative))
        return entry | {"source_rows": rows, "reused_rows": rows, "translated_rows": 0, "unchanged": True}
    todo_table = store.todo_path(kind, target.lang, slug)
    keys = workspace.local_dir("translate/todo") / f"{kind}.{target.lang}.{slug}.keys.npy"
    ensure_ray(config.ray)
    source_rows, todo_rows = in_task(plan_task, workspace, english, directory, todo_table, str(keys))
    entry |= {"source_rows": source_rows, "reused_rows": source_rows - todo_rows, "translated_rows": todo_rows}
    if todo_rows:
        schemas.require_columns(workspace.read_schema(todo_table), INPUT_COLUMNS, todo_table)
        logger.info("translate %s -> %s: %d of %d rows to translate (%d already in the store)", kind, target.lang,
                    todo_rows, source_rows, entry["reused_rows"])
        dataset = read_table_dataset(workspace, todo_table).map_batches(
            CT2TranslatorActor,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "model_dir": str(model_dir), "lang": target.lang, "mt_model": target.model,
                "source_prefix": target.source_prefix, "target_prefix": target.target_prefix,
                "settings": config.translate, "workspace": workspace.uri, "directory": directory,
            },
            **actor_map_args(config.translate),
        )
        started = time.perf_counter()
        for block in dataset.iter_rows():
            totals.add_block(block)
        totals.seconds += time.perf_counter() - started
        workspace.fs.delete_file(workspace.path(todo_table))
    in_task(view_task, workspace, directory, str(keys), english, kind, target.lang,
            _view_key(workspace, english, slug, directory), f"{target.model} [{slug}]")
    keys.unlink()
    return entry


def _view_key(workspace: Workspace, english: str, slug: str, directory: str) -> str:
    return digest(workspace.file_metadata(english).get("td_ray_source"), slug,
                  sorted(store.block_names(workspace, directory)))


def _copy_pretranslated(config: PipelineConfig, workspace: Workspace, kind: str, target: TranslateTarget) -> dict | None:
    """Take the rows of a pre-translated collection whose ids are in the English input, checked like MT output.

    Ray Data streams the English rows through actors that look each id up in the pre-translated text (mapped,
    shared by the actors of a node) and run the quality checks; the view is skipped when the English input,
    the pre-translated collection and the quality settings are all unchanged.
    """
    pretranslated = target.pretranslated if kind == "passages" else target.pretranslated_queries
    if pretranslated is None:
        return None
    field = f"translate.targets[{target.lang}].pretranslated" + ("" if kind == "passages" else "_queries")
    source = ingest(workspace, pretranslated, "docs" if kind == "passages" else "queries",
                    f"pretranslated_{kind}.{target.lang}", field)
    name = f"pretranslated:{getattr(pretranslated, 'id', None) or Path(pretranslated.path).name}"
    english, relative = ENGLISH[kind], translated(kind, target.lang)
    entry = {"kind": kind, "lang": target.lang, "mt_model": name, "reused_rows": 0, "translated_rows": 0}
    key = digest(workspace.file_metadata(english).get("td_ray_source"), workspace.file_metadata(source).get("td_ray_source"),
                 target.lang, name, config.translate.quality.model_dump(mode="json"))
    if _unchanged(workspace, relative, key):
        rows = workspace.row_count(relative)
        logger.info("translate %s -> %s: unchanged (English input, %s, quality settings), %d rows in %s", kind,
                    target.lang, name, rows, workspace.path(relative))
        flags = json.loads(workspace.file_metadata(relative).get("td_ray_flags", "{}"))
        return entry | {"source_rows": rows, "copied_rows": 0, "flags": flags, "unchanged": True}
    ensure_ray(config.ray)
    lookup = in_task(export_text, workspace, source, workspace.local_dir("text"))
    flags: Counter = Counter()

    def check_coverage(batch: pa.Table) -> pa.Table:
        lacking = batch.filter(pc.is_null(batch["text"]))
        if lacking.num_rows:
            raise SourceError(
                f"{field}: the pre-translated {target.lang} collection lacks English ids, e.g. "
                f"{lacking['id'].slice(0, 3).to_pylist()}; translate them with an MT model (translate.targets[].model) "
                "or use a pre-translated collection that covers them"
            )
        flags.update(flag for row in batch["flags"].to_pylist() for flag in set(flag_names(row)))
        return batch

    dataset = read_table_dataset(workspace, english).map_batches(
        PretranslatedCheckActor, batch_format="pyarrow",
        fn_constructor_kwargs={"lookup": str(lookup), "lang": target.lang, "mt_model": name,
                               "quality": config.translate.quality},
        **actor_map_args(config.translate),
    )
    rows = write_stream(dataset, workspace, relative, schemas.TRANSLATIONS, ["id"],
                        expected=workspace.key_batches(english, ["id"]), transform=check_coverage,
                        metadata=lambda: {"td_ray_view": key, "td_ray_mt_model": name,
                                          "td_ray_flags": json.dumps(dict(flags))})
    return entry | {"source_rows": rows, "copied_rows": rows, "flags": dict(flags)}


def run(config: PipelineConfig) -> StageResult:
    """Translate (or import) every target language; each (id, lang) comes out exactly once."""
    started = time.perf_counter()
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "translate") as run_id:
        workspace.remove_temporaries("inputs", "translate", "text")
        ingest(workspace, config.data.passages, "docs", "passages")
        ingest(workspace, config.data.train_queries, "queries", "train_queries")
        model_dirs = _check_models(config, workspace)
        kinds = ["passages"] + (["queries"] if config.translate.translate_queries else [])
        totals, entries, outputs, metrics = _Totals(), [], {}, defaultdict(float)
        for target in config.translate.targets:
            for kind in kinds:
                if target.model is not None:
                    entry = _translate_missing(config, workspace, kind, target, model_dirs[target.lang], totals)
                else:
                    entry = _copy_pretranslated(config, workspace, kind, target)
                    if entry is None:
                        continue
                    for flag, count in entry["flags"].items():
                        metrics[f"flags_{flag}"] += count
                entries.append(entry)
                outputs[f"{kind}.{target.lang}"] = workspace.path(translated(kind, target.lang))
                metrics[f"rows_{kind}_{target.lang}"] = float(entry["source_rows"])
                metrics["reused_rows"] += entry["reused_rows"]
        for name, value in totals.metrics().items():
            metrics[name] = metrics.get(name, 0.0) + value
        manifest = store.write_manifest(workspace, run_id, entries)
        outputs["manifest"] = workspace.path(manifest)
        result = StageResult("translate", totals.counts["rows"], time.perf_counter() - started, outputs,
                             dict(metrics), run_id)
        tracking.log_result(result)
        _log_actor_throughput(totals)
    logger.info(result.summary())
    return result


def _log_actor_throughput(totals: _Totals) -> None:
    import mlflow

    for step, actor in enumerate(sorted(totals.actor_tokens)):
        seconds = totals.actor_seconds[actor]
        mlflow.log_metric("actor_tokens_per_s", totals.actor_tokens[actor] / seconds if seconds else 0.0, step=step)
