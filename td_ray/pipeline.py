"""Run the five stages in order under one MLflow parent run; the embedded demo config."""
from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path

import yaml

from td_ray import distill, evaluate, index, score, tracking, translate
from td_ray.config import ConfigError, PipelineConfig, apply_overrides, parse_config
from td_ray.fingerprint import digest
from td_ray.node_cache import cache_root
from td_ray.preflight import check_config
from td_ray.ray_session import ensure_ray
from td_ray.result import StageResult
from td_ray.workspace import UNTRAINED, Workspace, atomic_write_text, redacted, untrained_label

logger = logging.getLogger(__name__)

STAGES: dict[str, Callable[[PipelineConfig], StageResult]] = {
    "translate": translate.run,
    "score": score.run,
    "distill": distill.run,
    "index": index.run,
    "evaluate": evaluate.run,
}
DEMO_WORKSPACE = "./td-ray-workspace"
UNTRAINED_EVALUATE = untrained_label("evaluate")


def demo_assets_root(workspace: str) -> Path:
    """Where the demo's tiny models and collection are built: the workspace itself, or for an object-store workspace a
    folder on the driver's disk (its inputs are read there, and its models shared with the cluster)."""
    if "://" not in workspace:
        return Path(Workspace(workspace).root)
    return cache_root() / "demo-assets" / digest(workspace)


def demo_config(workspace: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The embedded demo config, with its workspace set to `workspace` (default ./td-ray-workspace) and `overrides`
    (``section.field=value``) applied."""
    workspace = workspace or DEMO_WORKSPACE
    text = resources.files("td_ray").joinpath("configs/demo.yaml").read_text(encoding="utf-8")
    if "://" in workspace:
        text = text.replace("{workspace}/", f"{demo_assets_root(workspace)}/")
    raw = apply_overrides(yaml.safe_load(text), overrides or [])
    return parse_config(raw, source="td_ray/configs/demo.yaml", workspace=workspace)


def prepare_demo_assets(config: PipelineConfig, meanwhile: Callable[[], object] | None = None) -> Future | None:
    """Build the tiny models and the demo collection (`demo_assets_root`), once (both are cached).

    With `meanwhile`, when the models must be built: they build on another thread while `meanwhile` runs on this one
    (Ray's start-up, say), and this returns once the MT model and the student exist, with the teacher's fine-tuning
    (seconds) still going on: the future it returns ends with it, and only the score stage needs to wait for it.
    Without, everything is built before it returns None."""
    from td_ray.assets.build import COMPLETE_MARKER
    from td_ray.assets.demo_data import write_demo_collection

    def build_base() -> None:
        from td_ray.assets.tiny_models import build_tiny_base

        build_tiny_base(root / "tiny-models")

    def build_teacher(after: Future | None = None) -> None:
        from td_ray.assets.tiny_models import build_tiny_teacher

        if after is not None:
            after.result()  # no teacher over a base that failed
        build_tiny_teacher(root / "tiny-models")

    root = demo_assets_root(config.workspace)
    data_dir = root / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / ".complete"
    if not marker.exists():
        write_demo_collection(data_dir)
        atomic_write_text(marker, "ok\n")
    teacher_built = (root / "tiny-models" / "cross_encoder" / COMPLETE_MARKER).is_file()
    if meanwhile is None or teacher_built:
        build_base()
        build_teacher()
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="demo-assets")
    base = pool.submit(build_base)
    teacher = pool.submit(build_teacher, base)
    pool.shutdown(wait=False)
    meanwhile()
    base.result()
    return teacher


def stop_on_findings(config: PipelineConfig, building: list[str | None] = ()) -> None:
    """Log the config's warnings (`preflight.check_config`) and stop on its errors, before anything runs; the model
    directories in `building` are being built now."""
    findings = check_config(config, building)
    for finding in findings:
        if finding.severity == "warning":
            logger.warning("%s", finding)
    errors = [str(finding) for finding in findings if finding.severity == "error"]
    if errors:
        raise ConfigError("the config cannot run as it is:\n  " + "\n  ".join(errors))


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None) -> list[StageResult]:
    """Run `stages` (default all five) in order, each as a child run of one pipeline run."""
    import mlflow

    chosen = stages or list(STAGES)
    unknown = [stage for stage in chosen if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    teacher = (prepare_demo_assets(config, meanwhile=lambda: (ensure_ray(config.ray), tracking.configure(config)))
               if config.demo_assets else None)
    stop_on_findings(config, building=[config.score.teacher] if teacher else [])
    started = time.perf_counter()
    results = []
    with tracking.pipeline_run(config) as parent_run_id:
        for stage in chosen:
            if stage == "score" and teacher is not None:
                teacher.result()  # the demo's teacher, fine-tuned while translate ran
            results.append(STAGES[stage](config))
        if config.compare_untrained and "evaluate" in chosen:
            results += _run_untrained(config)
        _promote(config, results)
        # The parent run carries the headline numbers, so runs compare at a glance in the UI.
        for result in results:
            if result.stage in ("evaluate", UNTRAINED_EVALUATE):
                prefix = "" if result.stage == "evaluate" else f"{UNTRAINED}_"
                mlflow.log_metrics({prefix + tracking.metric_key(name): value for name, value in result.metrics.items()})
        mlflow.log_metrics({f"{re.sub(r'[^A-Za-z0-9]+', '_', result.stage).strip('_')}_seconds": result.seconds
                            for result in results}
                           | {"seconds": time.perf_counter() - started})
        _write_report(config, parent_run_id)
    return results


def _promote(config: PipelineConfig, results: list[StageResult]) -> None:
    """Tag the distilled student's version with this run's evaluation and, with `mlflow.promote`, move its alias
    to it if it beats the alias's version; a run whose student was unchanged moves no alias."""
    from mlflow import MlflowClient

    from td_ray.promotion import evaluation_key, promote, tag_evaluation

    by_stage = {result.stage: result for result in results}
    distilled, evaluated = by_stage.get("distill"), by_stage.get("evaluate")
    if distilled is None or evaluated is None or config.index.model is not None:  # evaluate searched another model
        return
    name, version = config.mlflow.registered_model, str(int(distilled.metrics["model_version"]))
    client = MlflowClient(tracking.tracking_uri(config))
    tag_evaluation(client, name, version, evaluation_key(config),
                   {measure: evaluated.metrics[measure] for measure in config.evaluate.measures
                    if measure in evaluated.metrics})
    if config.mlflow.promote is None:
        return
    if distilled.metrics.get("unchanged"):
        logger.info("promote: the student is unchanged since it was registered; @%s stays",
                    config.mlflow.promote.alias)
        return
    promote(client, name, version, config.mlflow.promote)


def _write_report(config: PipelineConfig, parent_run_id: str) -> None:
    """The workspace's report, logged to the pipeline run. It only views what the stages wrote, so a failure to
    draw it is logged and the run, whose outputs are all in place, still succeeds."""
    from td_ray.report import write_report

    try:
        write_report(config.workspace, tracking.tracking_uri(config), parent_run_id)
    except Exception:  # noqa: BLE001 - see the docstring
        logger.exception("report: could not be written; the stages' outputs are complete (`td-ray report` retries)")


def untrained_config(config: PipelineConfig) -> PipelineConfig:
    """`config`'s index and evaluate settings over the untrained student, in `{workspace}/untrained`, tracked in the
    same MLflow store."""
    inner = Workspace(config.workspace).child_uri(UNTRAINED)
    raw = config.model_dump(mode="json")
    raw |= {"workspace": inner, "compare_untrained": False, "demo_assets": False}
    raw["index"]["model"] = str(Workspace(inner).local_dir("student"))  # built here, shared with the cluster
    raw["mlflow"]["tracking_uri"] = tracking.tracking_uri(config)
    return PipelineConfig.model_validate(raw)


def _run_untrained(config: PipelineConfig) -> list[StageResult]:
    """Index and evaluate the student as distill starts it; results and MLflow runs are named
    `index (untrained)` and `evaluate (untrained)`."""
    from mlflow import MlflowClient

    from td_ray.assets.build import cached_build
    from td_ray.distill.train import save_untrained_student
    from td_ray.fingerprint import digest, path_fingerprint

    untrained = untrained_config(config)
    start = config.distill
    key = digest(start.student, path_fingerprint(start.student) if Path(start.student).exists() else None,
                 start.student_kind, start.colbert_dim, start.pooling, start.similarity, start.query_maxlen,
                 start.passage_maxlen, start.seed)
    cached_build(Path(untrained.index.model), key, lambda staged: save_untrained_student(start, staged),
                 "untrained student")
    results = []
    client = MlflowClient(tracking.tracking_uri(config))
    for stage in ("index", "evaluate"):
        result = replace(STAGES[stage](untrained), stage=untrained_label(stage))
        if result.run_id is not None:
            client.set_tag(result.run_id, "mlflow.runName", result.stage)
        results.append(result)
    return results


def _cost(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def format_summary(results: list[StageResult], config: PipelineConfig) -> str:
    """A table of rows, throughput and headline metrics per stage, the evaluation beside its references, then where
    the outputs are."""
    currency = config.cost.currency
    lines = [f"{'stage':<20} {'rows':>8} {'seconds':>8} {'rows/s':>9} {'CPU-h':>8} {'GPU-h':>8} "
             f"{'cost ' + currency:>10}  metrics"]
    totals = {"cpu_hours": 0.0, "gpu_hours": 0.0, "cost": 0.0}
    for result in results:
        shown = {} if result.stage.startswith("evaluate") else {
            name: value for name, value in result.metrics.items() if name in ("final_loss", "steps", "model_version", "dim")}
        metrics = "  ".join(f"{name}={value:.4g}" for name, value in shown.items())
        used = result.usage
        for name in totals:
            totals[name] += used.get(name, float("nan") if name == "cost" else 0.0)
        lines.append(f"{result.stage:<20} {result.rows:>8} {result.seconds:>8.1f} {result.throughput:>9.1f} "
                     f"{used.get('cpu_hours', 0.0):>8.4f} {used.get('gpu_hours', 0.0):>8.4f} "
                     f"{_cost(used.get('cost')):>10}  {metrics}")
    lines.append(f"{'all stages':<48} {totals['cpu_hours']:>8.4f} {totals['gpu_hours']:>8.4f} {_cost(totals['cost']):>10}"
                 + ("" if config.cost.cpu_hour is not None else "  (set cost.cpu_hour and cost.gpu_hour to price it)"))
    by_stage = {result.stage: result for result in results}
    if "evaluate" in by_stage or UNTRAINED_EVALUATE in by_stage:
        measures = config.evaluate.measures
        systems = []
        if "evaluate" in by_stage:
            systems.append(("student, trained", by_stage["evaluate"].metrics))
        if UNTRAINED_EVALUATE in by_stage:
            systems.append(("student, untrained", by_stage[UNTRAINED_EVALUATE].metrics))
        if config.evaluate.bm25_reference and "evaluate" in by_stage:
            systems.append(("BM25 of the topics (no student)",
                            {name: by_stage["evaluate"].metrics.get(f"bm25_{name}", float("nan")) for name in measures}))
        topics = by_stage.get("evaluate", by_stage.get(UNTRAINED_EVALUATE)).rows
        lines.append(f"{f'evaluation ({topics} topics)':<42}" + "".join(f"{name:>9}" for name in measures))
        for label, metrics in systems:
            lines.append(f"  {label:<40}" + "".join(f"{metrics.get(name, float('nan')):>9.4f}" for name in measures))
    lines.append(f"workspace: {redacted(config.workspace)}")
    for result in results:
        for name, where in result.outputs.items():
            lines.append(f"  {result.stage}.{name}: {where}")
    workspace = Workspace(config.workspace)
    if workspace.exists("report/report.html"):
        lines.append(f"report: {workspace.location('report/report.html')} (also logged to the pipeline's MLflow run)")
    lines.append(f"MLflow: {tracking.tracking_uri(config)} (experiment {config.mlflow.experiment!r})")
    if Path(config.workspace).exists() and tracking.tracking_uri(config).startswith("sqlite:///"):
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        lines.append(f"  open the UI: {mlflow_cli} ui --backend-store-uri {tracking.tracking_uri(config)} --host 127.0.0.1")
    return "\n".join(lines)
