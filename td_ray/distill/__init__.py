"""distill: Ray Train (TorchTrainer, DDP) fits the student dual encoder to the teacher with a KL loss.

Examples join the score table with passage text in `distill.passage_lang`; the final model is saved in HF
format under ``distill/student`` and registered in MLflow with an alias and its lineage.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig
from td_ray.distill.data import build_examples
from td_ray.distill.registry import register_student
from td_ray.distill.train import HF_DIR, train_loop
from td_ray.ray_session import ensure_ray
from td_ray.result import StageResult
from td_ray.workspace import (
    SCORES,
    STUDENT_DIR,
    TRAIN_QUERIES_EN,
    Workspace,
    translated,
)

logger = logging.getLogger(__name__)

__all__ = ["run", "train_loop"]

EXAMPLES = "distill/examples.parquet"
_BLOCK_ROWS = 512


def make_trainer(config: PipelineConfig, workspace: Workspace, dataset, run_id: str | None):
    """The TorchTrainer for this config; the same run name and storage resume from the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    options = config.distill
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "distill": options.model_dump(mode="json"),
            "student": options.student,
            "tracking_uri": tracking.tracking_uri(config),
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                     resources_per_worker={"CPU": options.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{options.run_name}-{config.fingerprint()}",
                             storage_path=str(workspace.local_dir("ray_train")),
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )


def _replace_dir(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary name, so `target` is always whole."""
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    if target.exists():
        shutil.rmtree(target)
    temporary.rename(target)


def run(config: PipelineConfig) -> StageResult:
    """Build examples, train with Ray Train, save and register the student."""
    import ray.data

    started = time.perf_counter()
    options = config.distill
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "distill") as run_id:
        passages = translated("passages", options.passage_lang)
        for table, columns in ((SCORES, ("qid", "pid", "score")), (TRAIN_QUERIES_EN, ("id", "text")), (passages, ("id", "text"))):
            schemas.require_columns(workspace.read_schema(table), columns, table)
        examples, skipped = build_examples(workspace.read_table(SCORES), workspace.read_table(TRAIN_QUERIES_EN),
                                           workspace.read_table(passages), options.nway, options.short_list_policy,
                                           options.top_k)
        if examples.num_rows < options.batch_size * options.num_workers:
            raise ValueError(f"only {examples.num_rows} training examples for batch_size {options.batch_size} x "
                             f"{options.num_workers} workers; lower them or score more queries")
        workspace.write_table(examples, EXAMPLES, schemas.EXAMPLES)
        ensure_ray(config.ray)
        # Examples enter as in-memory blocks: a file read would need CPUs that the training workers hold.
        dataset = ray.data.from_arrow([examples.slice(start, _BLOCK_ROWS) for start in range(0, examples.num_rows, _BLOCK_ROWS)])
        result = make_trainer(config, workspace, dataset, run_id).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error}")
        student_dir = Path(workspace.path(STUDENT_DIR))
        with result.checkpoint.as_directory() as directory:
            _replace_dir(Path(directory) / HF_DIR, student_dir)
        teacher = config.score.provenance
        lineage = {
            "td_ray.teacher": teacher,
            "td_ray.passage_lang": options.passage_lang,
            "td_ray.mt_model": next((t.model or "pretranslated" for t in config.translate.targets if t.lang == options.passage_lang), "none"),
            "td_ray.train_queries": config.data.train_queries.model_dump_json(),
            "td_ray.passages": config.data.passages.model_dump_json(),
            "td_ray.config_hash": config.fingerprint(),
        }
        version = register_student(student_dir, config.mlflow.registered_model, config.mlflow.alias, lineage)
        metrics = {"steps": float(result.metrics.get("step", 0)),
                   "start_step": float(result.metrics.get("start_step", 0)),
                   "examples": float(examples.num_rows), "skipped_queries": float(len(skipped)), "model_version": float(version)}
        if "loss" in result.metrics:  # absent when a finished run was resumed and trained no further
            metrics["final_loss"] = float(result.metrics["loss"])
        stage = StageResult("distill", examples.num_rows, time.perf_counter() - started,
                            {"student": str(student_dir), "model": f"models:/{config.mlflow.registered_model}@{config.mlflow.alias}"},
                            metrics, run_id)
        tracking.log_result(stage)
    logger.info(stage.summary())
    return stage
