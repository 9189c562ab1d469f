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

from td_ray import schemas
from td_ray.config import PipelineConfig, TranslateTarget
from td_ray.fingerprint import digest
from td_ray.raydata import actor_map_args, in_task, read_table_dataset, write_stream
from td_ray.result import StageResult
from td_ray.sources import SourceError
from td_ray.stage import Outcome, Source, Stage, StageContext, run_stage, training_sources
from td_ray.textjoin import export_text
from td_ray.translate import store
from td_ray.translate.actor import (
    INPUT_COLUMNS,
    CT2TranslatorActor,
    PretranslatedCheckActor,
    plan_task,
    translate_map_args,
    view_task,
)
from td_ray.translate.core import SentencePieceCodec, resolve_ct2_model
from td_ray.translate.quality import flag_names
from td_ray.workspace import CANDIDATES, PASSAGES_EN, TRAIN_QUERIES_EN, Workspace, translated

logger = logging.getLogger(__name__)

__all__ = ["STAGE", "CT2TranslatorActor", "run"]

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


def _model_dir(workspace: Workspace, target: TranslateTarget) -> Path:
    """Resolve and open an MT model on the driver, so a bad model or prefix fails before any actor starts."""
    model_dir = resolve_ct2_model(target.model, workspace.local_dir("models/ct2"))
    SentencePieceCodec(model_dir, target.source_prefix, target.target_prefix)
    return model_dir


class _Part:
    """One (kind, target) of the stage: its output table and what it is made from."""

    def __init__(self, context: StageContext, kind: str, target: TranslateTarget, model_dir: Path | None):
        workspace, self.kind, self.target = context.workspace, kind, target
        self.name, self.relative, self.english = f"{kind}.{target.lang}", translated(kind, target.lang), ENGLISH[kind]
        if model_dir is not None:
            self.model_dir = model_dir
            self.slug = store.model_slug(target, self.model_dir, context.options)
            self.directory = store.store_dir(kind, target.lang, self.slug)
            self.key = _view_key(workspace, self.english, self.slug, self.directory)
        else:
            self.pretranslated = target.pretranslated if kind == "passages" else target.pretranslated_queries
            self.source = f"inputs/pretranslated_{kind}.{target.lang}.parquet"
            self.mt_model = ("pretranslated:" + (getattr(self.pretranslated, "id", None)
                                                 or Path(self.pretranslated.path).name)) if self.pretranslated else None
            self.key = digest(workspace.file_metadata(self.english).get("td_ray_source"),
                              workspace.file_metadata(self.source).get("td_ray_source"), target.lang, self.mt_model,
                              context.options.quality.model_dump(mode="json")) if self.pretranslated else None


def _parts(context: StageContext) -> list[_Part]:
    """The stage's parts, each MT model resolved once: made for the stage's key, reused by its work."""
    if "parts" not in context.memo:
        kinds = ["passages"] + (["queries"] if context.options.translate_queries else [])
        parts = []
        for target in context.options.targets:
            model_dir = _model_dir(context.workspace, target) if target.model is not None else None
            parts += [_Part(context, kind, target, model_dir) for kind in kinds]
        context.memo["parts"] = [part for part in parts if part.key is not None]
    return context.memo["parts"]


def _translate_missing(context: StageContext, part: _Part, totals: _Totals) -> dict:
    """Translate the rows of the part that the store lacks; write the view; return the manifest entry.

    The part's key names what the view is made from (the input, the model version and settings, the committed
    blocks): when it is unchanged the stage reads nothing more and says so.
    """
    workspace, options, target, kind = context.workspace, context.options, part.target, part.kind
    slug, directory, relative, english = part.slug, part.directory, part.relative, part.english
    entry = {"kind": kind, "lang": target.lang, "mt_model": target.model, "store": workspace.path(directory)}
    if context.unchanged_part(part.name, part.key, relative):
        rows = workspace.row_count(relative)
        logger.info("translate %s -> %s: unchanged (input, model, settings and store), %d rows reused from %s",
                    kind, target.lang, rows, workspace.path(relative))
        return entry | {"source_rows": rows, "reused_rows": rows, "translated_rows": 0, "unchanged": True,
                        "key": part.key}
    todo_table = store.todo_path(kind, target.lang, slug)
    keys = f"translate/todo/{kind}.{target.lang}.{slug}.keys.npy"
    context.ray()
    source_rows, todo_rows = in_task(plan_task, workspace, english, directory, todo_table, keys)
    entry |= {"source_rows": source_rows, "reused_rows": source_rows - todo_rows, "translated_rows": todo_rows}
    if todo_rows:
        schemas.require_columns(workspace.read_schema(todo_table), INPUT_COLUMNS, todo_table)
        logger.info("translate %s -> %s: %d of %d rows to translate (%d already in the store)", kind, target.lang,
                    todo_rows, source_rows, entry["reused_rows"])
        dataset = read_table_dataset(workspace, todo_table).map_batches(
            CT2TranslatorActor,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "model_dir": workspace.share(str(part.model_dir)), "lang": target.lang, "mt_model": target.model,
                "source_prefix": target.source_prefix, "target_prefix": target.target_prefix,
                "settings": options, "workspace": workspace.uri, "directory": directory, "lease": context.lease,
            },
            **translate_map_args(options),
        )
        started = time.perf_counter()
        for block in dataset.iter_rows():
            totals.add_block(block)
        totals.seconds += time.perf_counter() - started
        workspace.fs.delete_file(workspace.path(todo_table))
    key = _view_key(workspace, english, slug, directory)
    in_task(view_task, workspace, directory, keys, english, kind, target.lang, key, f"{target.model} [{slug}]")
    workspace.fs.delete_file(workspace.path(keys))
    return entry | {"key": key}


def _view_key(workspace: Workspace, english: str, slug: str, directory: str) -> str:
    return digest(workspace.file_metadata(english).get("td_ray_source"), slug,
                  sorted(store.block_names(workspace, directory)))


def _copy_pretranslated(context: StageContext, part: _Part) -> dict:
    """Take the rows of a pre-translated collection whose ids are in the English input, checked like MT output.

    Ray Data streams the English rows through actors that look each id up in the pre-translated text (mapped,
    shared by the actors of a node) and run the quality checks; the view is skipped when the English input,
    the pre-translated collection and the quality settings are all unchanged.
    """
    workspace, options, target, kind = context.workspace, context.options, part.target, part.kind
    field = f"translate.targets[{target.lang}].pretranslated" + ("" if kind == "passages" else "_queries")
    english, relative, source, name, key = part.english, part.relative, part.source, part.mt_model, part.key
    entry = {"kind": kind, "lang": target.lang, "mt_model": name, "reused_rows": 0, "translated_rows": 0, "key": key}
    if context.unchanged_part(part.name, key, relative):
        rows = workspace.row_count(relative)
        logger.info("translate %s -> %s: unchanged (English input, %s, quality settings), %d rows in %s", kind,
                    target.lang, name, rows, workspace.path(relative))
        flags = json.loads(workspace.file_metadata(relative).get("td_ray_flags", "{}"))
        return entry | {"source_rows": rows, "copied_rows": 0, "flags": flags, "unchanged": True}
    context.ray()
    lookup = in_task(export_text, workspace, source)
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
        fn_constructor_kwargs={"workspace": workspace.uri, "lookup": lookup, "lang": target.lang,
                               "mt_model": name, "quality": options.quality},
        **actor_map_args(options),
    )
    rows = write_stream(dataset, workspace, relative, schemas.TRANSLATIONS, ["id"],
                        expected=workspace.key_batches(english, ["id"]), transform=check_coverage,
                        metadata=lambda: {"td_ray_view": key, "td_ray_mt_model": name,
                                          "td_ray_flags": json.dumps(dict(flags))})
    return entry | {"source_rows": rows, "copied_rows": rows, "flags": dict(flags)}


class TranslateStage(Stage):
    """Translate (or import) every target language; each (id, lang) comes out exactly once."""

    name = "translate"
    temporaries = ("inputs", "translate", "text")

    def sources(self, config: PipelineConfig) -> list[Source]:
        limited = config.data.candidates.limit is not None  # a small run: only what its candidates name
        found = [source for source in training_sources(config) if limited or source.name != "candidates"]
        for target in config.translate.targets:
            for kind, source in (("passages", target.pretranslated), ("queries", target.pretranslated_queries)):
                if target.model is None and source is not None:
                    field = f"translate.targets[{target.lang}].pretranslated" + ("" if kind == "passages"
                                                                                 else "_queries")
                    within = (CANDIDATES, "pid" if kind == "passages" else "qid") if limited else None
                    found.append(Source(source, "docs" if kind == "passages" else "queries",
                                        f"pretranslated_{kind}.{target.lang}", field, within))
        return found

    def key(self, context: StageContext) -> str:
        return digest(sorted((part.name, part.key) for part in _parts(context)))

    def work(self, context: StageContext, key: str) -> Outcome:
        workspace = context.workspace
        totals, entries, outputs, metrics, parts = _Totals(), [], {}, defaultdict(float), {}
        for part in _parts(context):
            if part.target.model is not None:
                entry = _translate_missing(context, part, totals)
            else:
                entry = _copy_pretranslated(context, part)
                for flag, count in entry["flags"].items():
                    metrics[f"flags_{flag}"] += count
            parts[part.name] = entry.pop("key")
            entries.append(entry)
            outputs[part.name] = part.relative
            metrics[f"rows_{part.kind}_{part.target.lang}"] = float(entry["source_rows"])
            metrics["reused_rows"] += entry["reused_rows"]
        for name, value in totals.metrics().items():
            metrics[name] = metrics.get(name, 0.0) + value
        outputs["manifest"] = store.write_manifest(workspace, context.run_id, entries)
        _log_actor_throughput(totals)
        return Outcome(totals.counts["rows"], outputs, dict(metrics), parts=parts,
                       key=digest(sorted(parts.items())))


STAGE = TranslateStage()


def run(config: PipelineConfig) -> StageResult:
    """Run the translate stage (`TranslateStage`) on `config`."""
    return run_stage(STAGE, config)


def _log_actor_throughput(totals: _Totals) -> None:
    import mlflow

    for step, actor in enumerate(sorted(totals.actor_tokens)):
        seconds = totals.actor_seconds[actor]
        mlflow.log_metric("actor_tokens_per_s", totals.actor_tokens[actor] / seconds if seconds else 0.0, step=step)
