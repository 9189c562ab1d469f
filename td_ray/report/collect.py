"""What the report shows, gathered from MLflow (stage runs, step histories, the parent run's config) and the
workspace's tables (translation flags, teacher scores, per-query measures), each streamed, never held whole.

Whatever is missing (a stage not run, a table not written) is left out; nothing here raises for it.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import yaml

from td_ray.workspace import PER_QUERY, SCORES, UNTRAINED, Workspace, redacted, untrained_label

logger = logging.getLogger(__name__)

STAGE_ORDER = ("translate", "score", "distill", "index", "evaluate")
SCORE_BINS = 40
_TRANSLATION = re.compile(r"^(passages|queries)\.(.+)\.parquet$")


@dataclass
class StageRow:
    """One stage run's figures, as MLflow holds them."""

    label: str
    run_id: str
    status: str
    metrics: dict[str, float]
    outputs: dict[str, str]
    startup_seconds: float | None

    @property
    def tokens_per_s(self) -> float | None:
        if "tokens_per_s" in self.metrics:
            return self.metrics["tokens_per_s"]
        tokens, seconds = self.metrics.get("tokens"), self.metrics.get("seconds")
        return tokens / seconds if tokens and seconds else None


@dataclass
class ScoreSummary:
    """The teacher's score distribution: a histogram over fixed bins, and its moments."""

    count: int
    mean: float
    std: float
    counts: np.ndarray
    edges: np.ndarray
    teachers: list[str]


@dataclass
class ReportData:
    workspace: str
    parent_run_id: str | None
    config: dict | None
    stages: list[StageRow] = field(default_factory=list)
    qa_flags: dict[tuple[str, str], tuple[int, Counter]] = field(default_factory=dict)
    """(kind, lang) -> (rows, rows per flag name: the flag's text before its colon, e.g. length_ratio)."""
    mt_models: dict[str, list[str]] = field(default_factory=dict)
    scores: ScoreSummary | None = None
    training: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name (loss, lr) -> (step, value) pairs."""
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    """System (trained, untrained, BM25) -> measure name -> value."""
    measures: list[str] = field(default_factory=list)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    """System -> qid -> the first measure's value."""
    lineage: list[tuple[str, str]] = field(default_factory=list)

    def stage(self, label: str) -> StageRow | None:
        return next((row for row in self.stages if row.label == label), None)


def _same_path(a: str | None, b: str) -> bool:
    if not a:
        return False
    if "://" in a or "://" in b:
        return redacted(a).rstrip("/") == redacted(b).rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _runs_of(client, workspace: str) -> list:
    """Every run in every experiment of the store tagged with `workspace` (or its untrained folder), newest first."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, max_results=5000, order_by=["attributes.start_time DESC"])
    folders = (workspace, f"{workspace.rstrip('/')}/{UNTRAINED}")
    return [run for run in runs if any(_same_path(run.data.tags.get("td_ray.workspace"), f) for f in folders)]


def _startup(client, run, stage: str) -> float | None:
    """Seconds from the stage's start to its first output row; for distill, to its first optimizer step."""
    if stage == "distill":
        history = client.get_metric_history(run.info.run_id, "loss")
        if history:
            return (min(metric.timestamp for metric in history) - run.info.start_time) / 1000
    return run.data.metrics.get("startup_seconds")


def _newest_finished(runs: list, stage: str, folder: str, metric: str | None = None):
    """The newest finished run of `stage` in workspace `folder` (that logged `metric`, when given), or None."""
    return next((run for run in runs if run.data.tags.get("td_ray.stage") == stage and run.info.status == "FINISHED"
                 and (metric is None or metric in run.data.metrics)
                 and _same_path(run.data.tags.get("td_ray.workspace"), folder)), None)


def _stage_rows(client, runs: list, workspace: str) -> list[StageRow]:
    rows = []
    untrained = f"{workspace.rstrip('/')}/{UNTRAINED}"
    for stage in STAGE_ORDER:
        for folder, label in ((workspace, stage), (untrained, untrained_label(stage))):
            run = _newest_finished(runs, stage, folder)
            if run is None:
                continue
            outputs = {name.removeprefix("td_ray.output."): value for name, value in run.data.tags.items()
                       if name.startswith("td_ray.output.")}
            rows.append(StageRow(label, run.info.run_id, run.info.status, dict(run.data.metrics), outputs,
                                 _startup(client, run, stage)))
    return rows


def _qa_flags(workspace: Workspace) -> tuple[dict, dict]:
    """Flag counts and MT models per (kind, lang) translation table, streamed."""
    flags, models = {}, {}
    if not workspace.exists("translate"):
        return flags, models
    for info in sorted(workspace.fs.get_file_info(pafs.FileSelector(workspace.path("translate"))),
                       key=lambda item: item.base_name):
        match = _TRANSLATION.match(info.base_name)
        if not match:
            continue
        kind, lang = match.groups()
        rows, counts, seen = 0, Counter(), set()
        for batch in workspace.iter_batches(f"translate/{info.base_name}", ["flags", "mt_model"]):
            rows += batch.num_rows
            flat = pc.list_flatten(batch.column("flags"))
            if len(flat):
                names = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(flat, ":", max_splits=1), 0))
                counts.update({item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(names)})
            counts["(none)"] += int(pc.sum(pc.equal(pc.list_value_length(batch.column("flags")), 0)).as_py() or 0)
            seen.update(batch.column("mt_model").unique().to_pylist())
        flags[(kind, lang)] = (rows, counts)
        models.setdefault(lang, [])
        models[lang] = sorted(set(models[lang]) | {model for model in seen if model})
    return flags, models


def _scores(workspace: Workspace) -> ScoreSummary | None:
    """The teacher's scores in two streamed passes: the range, then a histogram and the moments."""
    if not workspace.exists(SCORES):
        return None
    low, high, teachers = np.inf, -np.inf, set()
    for batch in workspace.iter_batches(SCORES, ["score", "teacher"]):
        scores = batch.column("score").to_numpy(zero_copy_only=False)
        if len(scores):
            low, high = min(low, float(scores.min())), max(high, float(scores.max()))
        teachers.update(batch.column("teacher").unique().to_pylist())
    if not np.isfinite(low):
        return None
    edges = np.linspace(low, high if high > low else low + 1, SCORE_BINS + 1)
    counts = np.zeros(SCORE_BINS, dtype=np.int64)
    total, total_sq, count = 0.0, 0.0, 0
    for batch in workspace.iter_batches(SCORES, ["score"]):
        scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        counts += np.histogram(scores, bins=edges)[0]
        total, total_sq, count = total + scores.sum(), total_sq + (scores ** 2).sum(), count + len(scores)
    mean = total / count
    return ScoreSummary(count, mean, float(np.sqrt(max(total_sq / count - mean ** 2, 0.0))), counts, edges,
                        sorted(teacher for teacher in teachers if teacher))


def _per_query(workspace: Workspace, measure: str) -> dict[str, float]:
    if not workspace.exists(PER_QUERY):
        return {}
    table = workspace.read_table(PER_QUERY)
    chosen = table.filter(pc.equal(table["measure"], measure))
    return dict(zip(chosen["qid"].to_pylist(), chosen["value"].to_pylist()))


def _config(client, parent_run_id: str | None) -> dict | None:
    """The pipeline config the parent run logged, or None."""
    if parent_run_id is None:
        return None
    import mlflow

    try:
        text = mlflow.artifacts.load_text(f"{client.get_run(parent_run_id).info.artifact_uri}/config.yaml")
    except Exception as error:  # noqa: BLE001 - an old or foreign run without its config still gets a report
        logger.warning("report: no config.yaml on run %s (%s); lineage from the stage runs only", parent_run_id, error)
        return None
    return yaml.safe_load(text)


def _lineage(data: ReportData, config_hash: str | None) -> list[tuple[str, str]]:
    config = data.config or {}
    lines = []
    for target in (config.get("translate") or {}).get("targets", []):
        source = target.get("model") or (target.get("pretranslated") or {}).get("path") or "?"
        kind = "MT model" if target.get("model") else "pre-translated"
        used = ", ".join(data.mt_models.get(target["lang"], [])) or source
        lines.append((f"translation into {target['lang']}", f"{kind}: {used}"))
    score = config.get("score") or {}
    if score:
        teacher = ", ".join(data.scores.teachers) if data.scores else score.get("teacher") or "imported scores"
        lines.append(("teacher", f"{teacher} (revision {score.get('teacher_revision') or 'not pinned'})"))
    distill = data.stage("distill")
    if config.get("distill"):
        lines.append(("student (start)", f"{config['distill']['student']} ({config['distill'].get('student_kind')})"))
    if distill is not None and "model_version" in distill.metrics:
        registry = config.get("mlflow") or {}
        lines.append(("registered student", f"models:/{registry.get('registered_model', '?')}/"
                      f"{int(distill.metrics['model_version'])} (alias @{registry.get('alias', '?')})"))
    if config_hash:
        lines.append(("config hash", config_hash))
    return lines


def collect(workspace_root: str, tracking_uri: str, parent_run_id: str | None = None) -> ReportData:
    """Everything the report shows for `workspace_root`; `parent_run_id` defaults to its newest pipeline run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    workspace = Workspace(workspace_root)
    runs = _runs_of(client, workspace_root)
    if parent_run_id is None:
        parent_run_id = next((run.info.run_id for run in runs if run.info.run_name == "pipeline"
                              and _same_path(run.data.tags.get("td_ray.workspace"), workspace_root)), None)
    data = ReportData(workspace=workspace_root, parent_run_id=parent_run_id, config=_config(client, parent_run_id))
    data.stages = _stage_rows(client, runs, workspace_root)
    data.qa_flags, data.mt_models = _qa_flags(workspace)
    data.scores = _scores(workspace)
    training_run = _newest_finished(runs, "distill", workspace_root, metric="loss")
    if training_run is not None:  # the newest run that trained: a re-run that found nothing to do has no history
        for name in ("loss", "lr"):
            history = sorted(client.get_metric_history(training_run.info.run_id, name), key=lambda metric: metric.step)
            data.training[name] = [(metric.step, metric.value) for metric in history]
    data.measures = ((data.config or {}).get("evaluate") or {}).get("measures") or ["nDCG@20", "R@100", "RR@10"]
    keys = {measure: measure.replace("@", "_") for measure in data.measures}
    for label, system in (("evaluate", "student, trained"), (untrained_label("evaluate"), "student, untrained")):
        row = data.stage(label)
        if row is not None:
            data.evaluation[system] = {m: row.metrics[key] for m, key in keys.items() if key in row.metrics}
    trained = data.stage("evaluate")
    if trained is not None and any(f"bm25_{key}" in trained.metrics for key in keys.values()):
        data.evaluation["BM25 (no student)"] = {m: trained.metrics[f"bm25_{key}"] for m, key in keys.items()
                                                if f"bm25_{key}" in trained.metrics}
    first = data.measures[0]
    folders = {"student, trained": workspace}
    if workspace.exists(UNTRAINED):
        folders["student, untrained"] = Workspace(workspace.child_uri(UNTRAINED))
    for system, folder in folders.items():
        values = _per_query(folder, first)
        if values:
            data.per_query[system] = values
    newest = client.get_run(parent_run_id) if parent_run_id else (runs[0] if runs else None)
    data.lineage = _lineage(data, newest.data.tags.get("td_ray.config_hash") if newest else None)
    return data
