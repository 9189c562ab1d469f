"""translate: English passages and queries into each target language, through CTranslate2 actors on Ray Data.

A target is translated by an MT model, or read from a pre-translated collection (e.g. neuMARCO) that stands
in for this stage's output. Output: ``translate/{passages,queries}.<lang>.parquet`` (id, lang, text, mt_model).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig, TranslateTarget
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, read_table_dataset, sum_column, write_stream
from td_ray.result import StageResult
from td_ray.sources import SourceError, ingest
from td_ray.translate.actor import INPUT_COLUMNS, CT2TranslatorActor
from td_ray.translate.core import DecodingOptions, SentencePieceCodec, resolve_ct2_model
from td_ray.workspace import PASSAGES_EN, TRAIN_QUERIES_EN, Workspace, translated

logger = logging.getLogger(__name__)

__all__ = ["run", "CT2TranslatorActor"]


def _translate_table(config: PipelineConfig, workspace: Workspace, source: str, output: str,
                     target: TranslateTarget, model_dir: Path, counters: dict[str, float]) -> int:
    options = config.translate
    schemas.require_columns(workspace.read_schema(source), INPUT_COLUMNS, source)
    decoding = DecodingOptions(options.beam_size, options.max_input_length, options.max_decoding_length, options.batch_size)
    dataset = read_table_dataset(workspace, source).map_batches(
        CT2TranslatorActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir), "lang": target.lang, "mt_model": target.model, "options": decoding,
            "device": options.device, "compute_type": options.compute_type, "intra_threads": options.intra_threads,
            "source_prefix": target.source_prefix,
        },
        **actor_map_args(options),
    )

    def count(batch: pa.Table) -> pa.Table:
        for column in ("source_tokens", "target_tokens", "truncated"):
            counters[column] = counters.get(column, 0.0) + sum_column(batch, column)
        return batch

    expected = workspace.read_table(source, columns=["id"])
    return write_stream(dataset, workspace, output, schemas.TRANSLATIONS, ["id"], expected, transform=count)


def _copy_pretranslated(workspace: Workspace, source: str, english: str, output: str, lang: str, name: str) -> int:
    """Take the rows of a pre-translated collection whose ids are in the English input; all must be there."""
    english_ids = workspace.read_table(english, columns=["id"])
    table = workspace.read_table(source).join(english_ids, "id", join_type="inner")
    missing = english_ids.join(table, "id", join_type="left anti")
    if missing.num_rows:
        raise SourceError(
            f"pre-translated {lang} collection lacks {missing.num_rows} of the English ids, e.g. "
            f"{missing['id'].slice(0, 3).to_pylist()}; translate them with an MT model (translate.targets[].model) "
            "or use a pre-translated collection that covers the passages"
        )
    table = table.append_column("lang", pa.array([lang] * table.num_rows, pa.string()))
    table = table.append_column("mt_model", pa.array([name] * table.num_rows, pa.string()))
    workspace.write_table(table, output, schemas.TRANSLATIONS)
    return table.num_rows


def run(config: PipelineConfig) -> StageResult:
    """Translate (or import) every target language; each (id, lang) comes out exactly once."""
    started = time.perf_counter()
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "translate") as run_id:
        ingest(workspace, config.data.passages, "docs", "passages")
        ingest(workspace, config.data.train_queries, "queries", "train_queries")
        # Resolve and open every model on the driver first, so a bad model fails before any actor starts.
        model_dirs: dict[str, Path] = {}
        for target in config.translate.targets:
            if target.model is not None:
                model_dirs[target.lang] = resolve_ct2_model(target.model, workspace.local_dir("models/ct2"))
                SentencePieceCodec(model_dirs[target.lang], target.source_prefix)
        ensure_ray(config.ray)
        rows, counters, outputs = 0, {}, {}
        for target in config.translate.targets:
            for kind, english in (("passages", PASSAGES_EN), ("queries", TRAIN_QUERIES_EN)):
                output = translated(kind, target.lang)
                if target.model is not None:
                    if kind == "queries" and not config.translate.translate_queries:
                        continue
                    count = _translate_table(config, workspace, english, output, target, model_dirs[target.lang], counters)
                else:
                    pretranslated = target.pretranslated if kind == "passages" else target.pretranslated_queries
                    if pretranslated is None:
                        continue
                    field = f"translate.targets[{target.lang}].pretranslated" + ("" if kind == "passages" else "_queries")
                    source = ingest(workspace, pretranslated, "docs" if kind == "passages" else "queries",
                                    f"pretranslated_{kind}.{target.lang}", field)
                    name = f"pretranslated:{getattr(pretranslated, 'id', None) or Path(pretranslated.path).name}"
                    count = _copy_pretranslated(workspace, source, english, output, target.lang, name)
                rows += count
                counters[f"rows_{kind}_{target.lang}"] = count
                outputs[f"{kind}.{target.lang}"] = workspace.path(output)
                logger.info("translate %s -> %s: %d rows in %s", kind, target.lang, count, workspace.path(output))
        result = StageResult("translate", rows, time.perf_counter() - started, outputs, counters, run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result
