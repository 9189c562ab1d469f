"""translate: English passages and queries into each target language, through CTranslate2 actors on Ray Data.

Incremental and resumable (see `store`): rows are keyed by (id, lang, MT model, source text hash) and committed
per block by the actors, so only what is missing is translated. A target may instead be read from a
pre-translated collection (e.g. neuMARCO). Either way the stage writes ``translate/<kind>.<lang>.parquet``,
one row per input id, each checked for quality (`quality`) and flagged, never dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig, TranslateTarget
from td_ray.ray_session import ensure_ray
from td_ray.raydata import ExactlyOnceError, actor_map_args, read_table_dataset
from td_ray.result import StageResult
from td_ray.sources import SourceError, ingest
from td_ray.translate import store
from td_ray.translate.actor import INPUT_COLUMNS, CT2TranslatorActor
from td_ray.translate.core import SentencePieceCodec, resolve_ct2_model
from td_ray.translate.quality import check_translation, flag_names
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


def _translate_missing(config: PipelineConfig, workspace: Workspace, kind: str, target: TranslateTarget,
                       model_dir: Path, current: pa.Table, totals: _Totals) -> dict:
    """Translate the rows of (kind, target) that the store lacks; write the view; return the manifest entry."""
    slug = store.model_slug(target.model, target.source_prefix, target.target_prefix)
    directory = store.store_dir(kind, target.lang, slug)
    if store.clear_partial(workspace, directory):
        logger.info("translate %s -> %s: cleared half-written blocks of an interrupted run", kind, target.lang)
    todo = store.plan(current, store.committed_keys(workspace, directory))
    entry = {"kind": kind, "lang": target.lang, "mt_model": target.model, "store": workspace.path(directory),
             "source_rows": current.num_rows, "reused_rows": current.num_rows - todo.num_rows,
             "translated_rows": todo.num_rows}
    if todo.num_rows:
        todo_table = store.todo_path(kind, target.lang, slug)
        store.write_todo(workspace, ENGLISH[kind], todo, todo_table)
        schemas.require_columns(workspace.read_schema(todo_table), INPUT_COLUMNS, todo_table)
        ensure_ray(config.ray)
        logger.info("translate %s -> %s: %d of %d rows to translate (%d already in the store)", kind, target.lang,
                    todo.num_rows, current.num_rows, entry["reused_rows"])
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
        left = store.plan(current, store.committed_keys(workspace, directory))
        if left.num_rows:
            raise ExactlyOnceError(f"translate {kind} -> {target.lang}: {left.num_rows} rows were not committed, e.g. "
                                   f"{left['id'].slice(0, 3).to_pylist()}; run the stage again to finish them")
        workspace.fs.delete_file(workspace.path(todo_table))
    view_key = hashlib.sha256(json.dumps([workspace.file_metadata(ENGLISH[kind]).get("td_ray_source"), slug,
                                          sorted(store.block_names(workspace, directory))]).encode()).hexdigest()
    relative = translated(kind, target.lang)
    if todo.num_rows or not workspace.exists(relative) or workspace.file_metadata(relative).get("td_ray_view") != view_key:
        store.write_view(workspace, directory, current, kind, target.lang, view_key)
    return entry


def _copy_pretranslated(config: PipelineConfig, workspace: Workspace, kind: str, target: TranslateTarget) -> dict | None:
    """Take the rows of a pre-translated collection whose ids are in the English input, checked like MT output."""
    pretranslated = target.pretranslated if kind == "passages" else target.pretranslated_queries
    if pretranslated is None:
        return None
    field = f"translate.targets[{target.lang}].pretranslated" + ("" if kind == "passages" else "_queries")
    source = ingest(workspace, pretranslated, "docs" if kind == "passages" else "queries",
                    f"pretranslated_{kind}.{target.lang}", field)
    name = f"pretranslated:{getattr(pretranslated, 'id', None) or Path(pretranslated.path).name}"
    english = workspace.read_table(ENGLISH[kind]).rename_columns(["id", "english"])
    table = workspace.read_table(source).join(english, "id", join_type="inner")
    missing = english.join(table, "id", join_type="left anti")
    if missing.num_rows:
        raise SourceError(
            f"{field}: the pre-translated {target.lang} collection lacks {missing.num_rows} of the English ids, e.g. "
            f"{missing['id'].slice(0, 3).to_pylist()}; translate them with an MT model (translate.targets[].model) "
            "or use a pre-translated collection that covers them"
        )
    sources, texts = table["english"].to_pylist(), table["text"].to_pylist()
    flags = [check_translation(source, text, config.translate.quality) for source, text in zip(sources, texts)]
    view = pa.table({
        "id": table["id"], "lang": pa.array([target.lang] * table.num_rows), "text": table["text"],
        "mt_model": pa.array([name] * table.num_rows), "source_hash": store.text_hash(table["english"]),
        "flags": pa.array(flags, pa.list_(pa.string())),
    })
    workspace.write_table(view, translated(kind, target.lang), schemas.TRANSLATIONS)
    counted = Counter(flag for row in flags for flag in set(flag_names(row)))
    return {"kind": kind, "lang": target.lang, "mt_model": name, "source_rows": english.num_rows, "reused_rows": 0,
            "translated_rows": 0, "copied_rows": table.num_rows, "flags": dict(counted)}


def run(config: PipelineConfig) -> StageResult:
    """Translate (or import) every target language; each (id, lang) comes out exactly once."""
    started = time.perf_counter()
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "translate") as run_id:
        ingest(workspace, config.data.passages, "docs", "passages")
        ingest(workspace, config.data.train_queries, "queries", "train_queries")
        model_dirs = _check_models(config, workspace)
        kinds = ["passages"] + (["queries"] if config.translate.translate_queries else [])
        current = {kind: store.source_keys(workspace, ENGLISH[kind]) for kind in kinds}
        totals, entries, outputs, metrics = _Totals(), [], {}, defaultdict(float)
        for target in config.translate.targets:
            for kind in kinds:
                if target.model is not None:
                    entry = _translate_missing(config, workspace, kind, target, model_dirs[target.lang],
                                               current[kind], totals)
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
