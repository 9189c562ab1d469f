"""distill: Ray Train (TorchTrainer, DDP) fits the student (dense or ColBERT-X) to the teacher.

Ray Data groups the score table into one example row per query (ids and scores only) and streams them to the
workers; each worker joins query and passage text itself, in the configured language(s). The final model is saved
under ``distill/student`` and registered in MLflow with an alias and its lineage.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from td_ray import schemas, tracking
from td_ray.config import OPERATIONAL_DISTILL_FIELDS, PipelineConfig
from td_ray.distill.data import ExampleFilter, group_scores, read_positives
from td_ray.distill.registry import register_student
from td_ray.distill.train import HF_DIR, train_loop
from td_ray.fingerprint import digest
from td_ray.ray_session import ensure_ray
from td_ray.raydata import in_task, read_table_dataset
from td_ray.result import StageResult
from td_ray.sources import ingest
from td_ray.textjoin import TextLookup, check_coverage, export_text
from td_ray.workspace import (
    PASSAGES_EN,
    SCORES,
    STUDENT_DIR,
    TRAIN_QRELS,
    TRAIN_QUERIES_EN,
    Workspace,
    atomic_write_text,
    translated,
)

logger = logging.getLogger(__name__)

__all__ = ["run", "train_loop"]

EXAMPLES = "distill/examples.parquet"
DATA_CPUS = 1.0
"""CPUs the training workers must leave free: Ray Data reads the example shards with them while training runs."""


def make_trainer(config: PipelineConfig, workspace: Workspace, dataset, examples: int, run_id: str | None,
                 train_fn=train_loop, texts: dict | None = None):
    """The TorchTrainer for this config. Its run is named by `run_name` and the training identity
    (`training_key`): the same identity resumes from the last checkpoint, a changed input or training setting
    starts a new run. The examples are read in order, so one worker's shard is the same on every restart."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    options = config.distill
    ingest_options = DataConfig.default_ingest_options()
    ingest_options.preserve_order = True
    return TorchTrainer(
        train_fn,
        train_loop_config={
            "distill": options.model_dump(mode="json"),
            "student": options.student,
            "texts": texts or export_texts(config, workspace),
            "examples_per_worker": examples // options.num_workers,
            "tracking_uri": tracking.tracking_uri(config),
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                     resources_per_worker={"CPU": options.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{options.run_name}-{training_key(config, workspace)[:12]}",
                             storage_path=str(workspace.local_dir("ray_train")),
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=options.checkpoint_keep)),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest_options),
    )


def export_texts(config: PipelineConfig, workspace: Workspace) -> dict:
    """The lookup files the workers read text from: training queries, and passages per language (exported in Ray
    tasks, once per table version, and shared with the score stage)."""
    folder = workspace.local_dir("text")
    return {"queries": str(in_task(export_text, workspace, TRAIN_QUERIES_EN, folder)),
            "passages": {lang: str(in_task(export_text, workspace, translated("passages", lang), folder))
                         for lang in config.distill.passage_langs}}


def check_free_cpus(config: PipelineConfig) -> None:
    """Stop before training when the workers would take every CPU of a local cluster: the example shards could
    then never be read and training would wait forever."""
    import ray

    options = config.distill
    total = ray.cluster_resources().get("CPU", 0)
    left = total - options.num_workers * options.cpus_per_worker
    if left < DATA_CPUS:
        message = (f"distill: {options.num_workers} workers x {options.cpus_per_worker} CPUs leave {left:g} of the "
                   f"cluster's {total:g} CPUs free, but Ray Data needs {DATA_CPUS:g} to stream the examples; lower "
                   "distill.cpus_per_worker (fractions are fine) or distill.num_workers")
        if config.ray.address is None:
            raise ValueError(message)
        logger.warning("%s (continuing: an autoscaling cluster may add CPUs)", message)


def build_examples(config: PipelineConfig, workspace: Workspace) -> tuple[int, int]:
    """Write ``distill/examples.parquet`` in a Ray task (`write_examples`), off the driver; returns the rows written
    and the number of queries skipped as too short."""
    options = config.distill
    if options.positives == "qrels":
        schemas.require_columns(workspace.read_schema(TRAIN_QRELS), ("qid", "docid", "relevance"), TRAIN_QRELS)
    return in_task(write_examples, workspace, options, num_cpus=1)


def write_examples(workspace: Workspace, options) -> tuple[int, int]:
    """Group the score table by query (hash buckets on disk), attach qrels positives, drop or refuse queries that
    cannot fill nway, and write the examples, each qid once."""
    positives = read_positives(workspace.read_table(TRAIN_QRELS)) if options.positives == "qrels" else None
    keep = ExampleFilter(options.nway, options.short_list_policy, positives)
    with workspace.exactly_once_writer(EXAMPLES, schemas.EXAMPLES, ["qid"]) as writer:
        for examples in group_scores(workspace, SCORES, "distill/.groups", options.top_k):
            writer.write(keep(examples))
    keep.report()
    return writer.rows, len(keep.skipped)


def check_texts(config: PipelineConfig, workspace: Workspace, texts: dict) -> None:
    """Every query and candidate (and qrels positive) of the examples has its text, in every passage language;
    checked in a Ray task against the exported lookups, so the driver reads no text."""
    in_task(_check_texts, workspace, texts, config.distill.passage_langs)


def _check_texts(workspace: Workspace, texts: dict, langs: list[str]) -> None:
    check_coverage(workspace, EXAMPLES, "qid", TextLookup(texts["queries"], "training queries"),
                   "the score table and the training queries must come from the same collection")
    for lang in langs:
        lookup = TextLookup(texts["passages"][lang], f"passages ({lang})")
        for column in ("pids", "positives"):
            check_coverage(workspace, EXAMPLES, column, lookup,
                           f"translate those passages into {lang} first (translate.targets)")


def _replace_dir(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary name, so `target` is always whole."""
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    if target.exists():
        shutil.rmtree(target)
    temporary.rename(target)


TRAINED_FILE = "td_ray_trained.json"
"""Beside the saved student: the training identity it was made from and the registry version it became."""


def training_tables(config: PipelineConfig) -> list[str]:
    """The tables distill trains from: scores, training queries, passages per language, and qrels for TT."""
    options = config.distill
    tables = [SCORES, TRAIN_QUERIES_EN] + [translated("passages", lang) for lang in options.passage_langs]
    return tables + ([TRAIN_QRELS] if options.positives == "qrels" else [])


def training_key(config: PipelineConfig, workspace: Workspace) -> str:
    """The training identity: the distill settings that change what is trained (all but
    OPERATIONAL_DISTILL_FIELDS), and the identity of every table it reads. Anything else in the config (MLflow,
    index, evaluate, the teacher's name in score) leaves it as it is, so changing it resumes the same run."""
    return digest(config.distill.model_dump(mode="json", exclude=set(OPERATIONAL_DISTILL_FIELDS)),
                  [workspace.table_identity(table) for table in training_tables(config)])


def _registered(config: PipelineConfig, student_dir: Path, key: str) -> str | None:
    """The registry version of a student already trained from `key`, if it is still registered."""
    import mlflow
    from mlflow.exceptions import MlflowException

    marker = student_dir / TRAINED_FILE
    if not marker.is_file():
        return None
    trained = json.loads(marker.read_text(encoding="utf-8"))
    if trained.get("key") != key or trained.get("model") != config.mlflow.registered_model:
        return None
    try:
        mlflow.MlflowClient().get_model_version(config.mlflow.registered_model, trained["version"])
    except MlflowException:
        return None
    return trained["version"]


def run(config: PipelineConfig) -> StageResult:
    """Build the examples, train with Ray Train, save and register the student.

    A student already trained and registered from the same settings and tables is reused, and the stage says so.
    """
    started = time.perf_counter()
    options = config.distill
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "distill") as run_id:
        workspace.remove_temporaries("inputs", "distill", "text")
        if options.positives == "qrels":
            ingest(workspace, config.data.train_qrels, "qrels", "train_qrels")
        required = [(SCORES, ("qid", "pid", "score")), (TRAIN_QUERIES_EN, ("id", "text"))]
        required += [(translated("passages", lang), ("id", "text")) for lang in options.passage_langs]
        for table, columns in required:
            schemas.require_columns(workspace.read_schema(table), columns, table)
        student_dir = Path(workspace.path(STUDENT_DIR))
        model = f"models:/{config.mlflow.registered_model}@{config.mlflow.alias}"
        key = training_key(config, workspace)
        version = _registered(config, student_dir, key)
        if version is not None:
            logger.info("distill: unchanged (settings, scores, queries and passages): the student in %s is "
                        "%s version %s", student_dir, config.mlflow.registered_model, version)
            stage = StageResult("distill", 0, time.perf_counter() - started, {"student": str(student_dir), "model": model},
                                {"model_version": float(version), "unchanged": 1.0}, run_id)
            tracking.log_result(stage)
            return stage
        ensure_ray(config.ray)
        check_free_cpus(config)
        examples, skipped = build_examples(config, workspace)
        if examples < options.batch_size * options.num_workers:
            raise ValueError(f"only {examples} training examples for batch_size {options.batch_size} x "
                             f"{options.num_workers} workers; lower them or score more queries")
        texts = export_texts(config, workspace)
        check_texts(config, workspace, texts)
        result = make_trainer(config, workspace, read_table_dataset(workspace, EXAMPLES), examples, run_id,
                              texts=texts).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as directory:
            _replace_dir(Path(directory) / HF_DIR, student_dir)
        version = register_student(student_dir, config.mlflow.registered_model, config.mlflow.alias,
                                   lineage(config, workspace))
        atomic_write_text(student_dir / TRAINED_FILE, json.dumps(
            {"key": key, "model": config.mlflow.registered_model, "version": version}))
        metrics = {"steps": float(result.metrics.get("step", 0)),
                   "start_step": float(result.metrics.get("start_step", 0)),
                   "examples": float(examples), "skipped_queries": float(skipped), "model_version": float(version)}
        if "loss" in result.metrics:  # absent when a finished run was resumed and trained no further
            metrics["final_loss"] = float(result.metrics["loss"])
        stage = StageResult("distill", examples, time.perf_counter() - started,
                            {"student": str(student_dir), "model": model}, metrics, run_id)
        tracking.log_result(stage)
    logger.info(stage.summary())
    return stage


def lineage(config: PipelineConfig, workspace: Workspace) -> dict[str, str]:
    """Tags on the registered student, read from the footers of the tables it was trained on (not from the config,
    which may have changed since score or translate ran): teacher and revision, MT model per language, sources."""
    options = config.distill
    made = json.loads(workspace.file_metadata(SCORES).get("td_ray_provenance", "{}"))
    teacher = made.get("teacher") or (f"import:{made.get('format')}:{Path(made['path']).name}" if "path" in made
                                      else "unknown")
    models = {lang: workspace.file_metadata(translated("passages", lang)).get("td_ray_mt_model", "unknown")
              for lang in options.passage_langs}
    return {
        "td_ray.teacher": teacher,
        "td_ray.teacher_revision": str(made.get("teacher_revision") or made.get("sha256") or "unknown"),
        "td_ray.scores": json.dumps(made, sort_keys=True)[:5000],
        "td_ray.student_kind": options.student_kind,
        "td_ray.loss": options.loss,
        "td_ray.passage_lang": ",".join(options.passage_langs),
        "td_ray.mixing": options.mixing if len(options.passage_langs) > 1 else "none",
        "td_ray.mt_model": ",".join(f"{lang}={model}" for lang, model in models.items()),
        "td_ray.train_queries": workspace.file_metadata(TRAIN_QUERIES_EN).get("td_ray_source", "unknown")[:5000],
        "td_ray.passages": workspace.file_metadata(PASSAGES_EN).get("td_ray_source", "unknown")[:5000]
        if workspace.exists(PASSAGES_EN) else "unknown",
        "td_ray.training_key": training_key(config, workspace),
        "td_ray.config_hash": config.fingerprint(),
    }
