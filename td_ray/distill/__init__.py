"""distill: Ray Train (TorchTrainer, DDP) fits the student (dense or ColBERT-X) to the teacher.

Ray Data groups the score table into one example row per query (ids and scores only) and streams them to the
workers; each worker joins query and passage text itself, in the configured language(s). The final model is saved
under ``distill/student`` and registered in MLflow with an alias and its lineage.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from td_ray import schemas
from td_ray.config import OPERATIONAL_DISTILL_FIELDS, DistillConfig, PipelineConfig
from td_ray.distill.data import EXAMPLE_ROW_GROUP, ExampleFilter, group_scores, read_positives
from td_ray.fingerprint import digest
from td_ray.raydata import in_task
from td_ray.result import StageResult
from td_ray.stage import Outcome, Source, Stage, StageContext, run_stage
from td_ray.textjoin import check_coverage, export_text, open_lookup
from td_ray.workspace import (
    PASSAGES_EN,
    SCORES,
    STUDENT_DIR,
    TRAIN_QRELS,
    TRAIN_QUERIES_EN,
    Workspace,
    translated,
)

logger = logging.getLogger(__name__)

__all__ = ["STAGE", "run"]

EXAMPLES = "distill/examples.parquet"


def make_trainer(options: DistillConfig, workspace: Workspace, run_id: str | None, tracking_uri: str,
                 train_fn=None, texts: dict | None = None):
    """The TorchTrainer for this config. Its run is named by `run_name` and the training identity
    (`training_key`): the same identity resumes from the last checkpoint, a changed input or training setting
    starts a new run. Each worker reads its share of the examples table from the workspace itself
    (`ExampleShard`): no Ray Data pipeline to start, and the same share on every restart."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from td_ray.distill.train import train_loop

    return TorchTrainer(
        train_fn or train_loop,
        train_loop_config={
            "distill": options.model_dump(mode="json"),
            "student": workspace.share(options.student),
            "workspace": workspace.uri,
            "examples": EXAMPLES,
            "texts": texts or export_texts(options, workspace),
            "tracking_uri": tracking_uri,
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                     resources_per_worker=worker_resources(options)),
        torch_config=TorchConfig(backend=ddp_backend(options)),
        run_config=RunConfig(name=f"{options.run_name}-{training_key(options, workspace)[:12]}",
                             storage_path=str(workspace.local_dir("ray_train")) if workspace.is_local
                             else workspace.path("ray_train"),
                             storage_filesystem=None if workspace.is_local else workspace.fs,
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=options.checkpoint_keep)),
    )


def worker_resources(options: DistillConfig) -> dict[str, float]:
    """What each training worker reserves: its CPUs, and with use_gpu its share of a GPU."""
    return {"CPU": options.cpus_per_worker} | ({"GPU": options.gpus_per_worker} if options.use_gpu else {})


def ddp_backend(options: DistillConfig) -> str:
    """nccl for workers that each hold a whole GPU; gloo on CPUs and for workers sharing a GPU (NCCL refuses two
    ranks on one device)."""
    return "nccl" if options.use_gpu and options.gpus_per_worker >= 1 else "gloo"


def export_texts(options: DistillConfig, workspace: Workspace) -> dict:
    """The lookup files the workers read text from: training queries, and passages per language (exported in Ray
    tasks, once per table version, and shared with the score stage)."""
    return {"queries": in_task(export_text, workspace, TRAIN_QUERIES_EN),
            "passages": {lang: in_task(export_text, workspace, translated("passages", lang))
                         for lang in options.passage_langs}}


def build_examples(options: DistillConfig, workspace: Workspace) -> tuple[int, int]:
    """Write ``distill/examples.parquet`` in a Ray task (`write_examples`), off the driver; returns the rows written
    and the number of queries skipped as too short."""
    return in_task(write_examples, workspace, options, num_cpus=1)


def write_examples(workspace: Workspace, options) -> tuple[int, int]:
    """Group the score table by query (hash buckets on disk), attach qrels positives, drop or refuse queries that
    cannot fill nway, and write the examples, each qid once."""
    positives = read_positives(workspace.read_table(TRAIN_QRELS)) if options.positives == "qrels" else None
    keep = ExampleFilter(options.nway, options.short_list_policy, positives)
    with workspace.exactly_once_writer(EXAMPLES, schemas.EXAMPLES, ["qid"]) as writer:
        for examples in group_scores(workspace, SCORES, "distill/.groups", options.top_k):
            writer.write(keep(examples), row_group_size=EXAMPLE_ROW_GROUP)
    keep.report()
    return writer.rows, len(keep.skipped)


def check_texts(options: DistillConfig, workspace: Workspace, texts: dict) -> None:
    """Every query and candidate (and qrels positive) of the examples has its text, in every passage language;
    checked in a Ray task against the exported lookups, so the driver reads no text."""
    in_task(_check_texts, workspace, texts, options.passage_langs)


def _check_texts(workspace: Workspace, texts: dict, langs: list[str]) -> None:
    check_coverage(workspace, EXAMPLES, "qid", open_lookup(workspace, texts["queries"], "training queries"),
                   "the score table and the training queries must come from the same collection")
    for lang in langs:
        lookup = open_lookup(workspace, texts["passages"][lang], f"passages ({lang})")
        for column in ("pids", "positives"):
            check_coverage(workspace, EXAMPLES, column, lookup,
                           f"translate those passages into {lang} first (translate.targets)")


def _save_student(workspace: Workspace, trained: Path) -> None:
    """The trained student into ``distill/student``, replacing the last one (on an object store, file by file)."""
    if workspace.is_local:
        _replace_dir(trained, Path(workspace.path(STUDENT_DIR)))
        return
    if workspace.exists(STUDENT_DIR):
        workspace.fs.delete_dir(workspace.path(STUDENT_DIR))
    workspace.upload(trained, STUDENT_DIR)


def _replace_dir(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary name, so `target` is always whole."""
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    if target.exists():
        shutil.rmtree(target)
    temporary.rename(target)


def training_tables(options: DistillConfig) -> list[str]:
    """The tables distill trains from: scores, training queries, passages per language, and qrels for TT."""
    tables = [SCORES, TRAIN_QUERIES_EN] + [translated("passages", lang) for lang in options.passage_langs]
    return tables + ([TRAIN_QRELS] if options.positives == "qrels" else [])


def training_key(options: DistillConfig, workspace: Workspace) -> str:
    """The training identity: the distill settings that change what is trained (all but
    OPERATIONAL_DISTILL_FIELDS), and the identity of every table it reads. Anything else in the config (MLflow,
    index, evaluate, the teacher's name in score) leaves it as it is, so changing it resumes the same run."""
    return digest(options.model_dump(mode="json", exclude=set(OPERATIONAL_DISTILL_FIELDS)),
                  [workspace.table_identity(table) for table in training_tables(options)])


class DistillStage(Stage):
    """Build the examples, train with Ray Train, save and register the student.

    A student already trained from the same settings and tables, and still registered under the same name, is
    reused, and the stage says so.
    """

    name = "distill"
    sections = ("mlflow", "ray")
    temporaries = ("inputs", "distill", "text")

    def sources(self, config: PipelineConfig) -> list[Source]:
        return [Source(config.data.train_qrels, "qrels", "train_qrels")] if config.distill.positives == "qrels" else []

    def reads(self, context: StageContext) -> list[tuple[str, tuple[str, ...]]]:
        options = context.options
        tables = [(SCORES, ("qid", "pid", "score")), (TRAIN_QUERIES_EN, ("id", "text"))]
        tables += [(translated("passages", lang), ("id", "text")) for lang in options.passage_langs]
        return tables + ([(TRAIN_QRELS, ("qid", "docid", "relevance"))] if options.positives == "qrels" else [])

    def key(self, context: StageContext) -> str:
        return digest(training_key(context.options, context.workspace), context.section("mlflow").registered_model)

    def reusable(self, context: StageContext, record: dict) -> bool:
        """The registered version the student became must still exist."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            mlflow.MlflowClient().get_model_version(context.section("mlflow").registered_model, record["version"])
        except MlflowException:
            return False
        return True

    def work(self, context: StageContext, key: str) -> Outcome:
        from td_ray.distill.registry import register_student  # torch and MLflow: not in the tasks that import this
        from td_ray.distill.train import HF_DIR

        options, workspace, registry = context.options, context.workspace, context.section("mlflow")
        context.ray()
        examples, skipped = build_examples(options, workspace)
        if examples // options.num_workers < options.batch_size:
            raise ValueError(f"only {examples} training examples for batch_size {options.batch_size} x "
                             f"{options.num_workers} workers; lower them or score more queries")
        texts = export_texts(options, workspace)
        check_texts(options, workspace, texts)
        result = make_trainer(options, workspace, context.run_id, context.tracking_uri, texts=texts).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as directory:
            trained = Path(directory) / HF_DIR
            _save_student(workspace, trained)
            version = register_student(trained, registry.registered_model, registry.alias,
                                       lineage(options, workspace, context.config_hash))
        metrics = {"steps": float(result.metrics.get("step", 0)),
                   "start_step": float(result.metrics.get("start_step", 0)),
                   "examples": float(examples), "skipped_queries": float(skipped), "model_version": float(version)}
        if "loss" in result.metrics:  # absent when a finished run was resumed and trained no further
            metrics["final_loss"] = float(result.metrics["loss"])
        metrics |= {name: float(result.metrics[name]) for name in ("steps_per_s", "host_syncs_per_step",
                                                                  "host_wait_ms_per_step") if name in result.metrics}
        model = f"models:/{registry.registered_model}@{registry.alias}"
        return Outcome(examples, {"student": STUDENT_DIR}, metrics, record={"version": version, "model": model})


STAGE = DistillStage()


def run(config: PipelineConfig) -> StageResult:
    """Run the distill stage (`DistillStage`) on `config`."""
    return run_stage(STAGE, config)


def lineage(options: DistillConfig, workspace: Workspace, config_hash: str) -> dict[str, str]:
    """Tags on the registered student, read from the footers of the tables it was trained on (not from the config,
    which may have changed since score or translate ran): teacher and revision, MT model per language, sources."""
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
        "td_ray.training_key": training_key(options, workspace),
        "td_ray.config_hash": config_hash,
    }
