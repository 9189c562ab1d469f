"""Run the five stages in order under one MLflow parent run; the embedded demo config."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from td_ray import distill, evaluate, index, score, tracking, translate
from td_ray.config import ConfigError, PipelineConfig, parse_config
from td_ray.result import StageResult
from td_ray.workspace import Workspace, atomic_write_text

logger = logging.getLogger(__name__)

STAGES: dict[str, Callable[[PipelineConfig], StageResult]] = {
    "translate": translate.run,
    "score": score.run,
    "distill": distill.run,
    "index": index.run,
    "evaluate": evaluate.run,
}
DEMO_WORKSPACE = "./td-ray-workspace"


def demo_config(workspace: str | None = None) -> PipelineConfig:
    """The embedded demo config, with its workspace set to `workspace` (default ./td-ray-workspace)."""
    text = resources.files("td_ray").joinpath("configs/demo.yaml").read_text(encoding="utf-8")
    return parse_config(yaml.safe_load(text), source="td_ray/configs/demo.yaml", workspace=workspace or DEMO_WORKSPACE)


def prepare_demo_assets(config: PipelineConfig) -> None:
    """Build the tiny models and the demo collection into the workspace, once (both are cached)."""
    from td_ray.assets.demo_data import write_demo_collection
    from td_ray.assets.tiny_models import build_tiny_models

    workspace = Workspace(config.workspace)
    build_tiny_models(workspace.local_dir("tiny-models"))
    data_dir = workspace.local_dir("demo")
    marker = data_dir / ".complete"
    if not marker.exists():
        write_demo_collection(data_dir)
        atomic_write_text(marker, "ok\n")


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None) -> list[StageResult]:
    """Run `stages` (default all five) in order, each as a child run of one pipeline run."""
    import mlflow

    chosen = stages or list(STAGES)
    unknown = [stage for stage in chosen if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if config.demo_assets:
        prepare_demo_assets(config)
    missing = config.missing_paths()
    if missing:
        raise ConfigError("input paths not found (fix them in the config):\n  " + "\n  ".join(missing))
    started = time.perf_counter()
    results = []
    with tracking.pipeline_run(config):
        for stage in chosen:
            results.append(STAGES[stage](config))
        # The parent run carries the headline numbers, so runs compare at a glance in the UI.
        evaluation = next((result for result in results if result.stage == "evaluate"), None)
        if evaluation is not None:
            mlflow.log_metrics({tracking.metric_key(name): value for name, value in evaluation.metrics.items()})
        mlflow.log_metrics({f"{result.stage}_seconds": result.seconds for result in results}
                           | {"seconds": time.perf_counter() - started})
    return results


def format_summary(results: list[StageResult], config: PipelineConfig) -> str:
    """A table of rows, throughput and headline metrics per stage, then where the outputs are."""
    lines = [f"{'stage':<10} {'rows':>8} {'seconds':>8} {'rows/s':>9}  metrics"]
    for result in results:
        shown = {name: value for name, value in result.metrics.items()
                 if result.stage == "evaluate" or name in ("final_loss", "steps", "model_version", "dim")}
        metrics = "  ".join(f"{name}={value:.4g}" for name, value in shown.items())
        lines.append(f"{result.stage:<10} {result.rows:>8} {result.seconds:>8.1f} {result.throughput:>9.1f}  {metrics}")
    lines.append(f"workspace: {config.workspace}")
    for result in results:
        for name, where in result.outputs.items():
            lines.append(f"  {result.stage}.{name}: {where}")
    lines.append(f"MLflow: {tracking.tracking_uri(config)} (experiment {config.mlflow.experiment!r})")
    if Path(config.workspace).exists() and tracking.tracking_uri(config).startswith("sqlite:///"):
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        lines.append(f"  open the UI: {mlflow_cli} ui --backend-store-uri {tracking.tracking_uri(config)} --host 127.0.0.1")
    return "\n".join(lines)
