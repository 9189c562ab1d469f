"""MLflow wiring: where the store is, one parent run per pipeline, one child run per stage.

MLflow 3 is assumed: ``log_model(name=...)`` and registry aliases, never the deprecated stages.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from td_ray.config import ConfigError, DataSource, IrDatasetsSource, PipelineConfig
from td_ray.cost import usage_cost
from td_ray.result import StageResult
from td_ray.usage import StageUsage
from td_ray.workspace import Workspace, redacted

logger = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def metric_key(measure: str) -> str:
    """MLflow metric names cannot hold `@`: nDCG@20 is stored as nDCG_20."""
    return measure.replace("@", "_")


def tracking_uri(config: PipelineConfig) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a sqlite store under a local workspace. A workspace on an
    object store has no place for a store every node reaches: it needs a tracking server."""
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workspace = Workspace(config.workspace)
    if not workspace.is_local:
        raise ConfigError(
            f"the workspace {workspace.location('')} is an object store, so MLflow needs a tracking server that every "
            "node reaches: set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to an `mlflow server --serve-artifacts` "
            "URL, e.g. http://mlflow.internal:5000"
        )
    database = workspace.local_dir("mlflow") / "mlflow.db"
    return f"sqlite:///{database}"


def configure(config: PipelineConfig) -> str:
    """Point MLflow at the pipeline's store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(config)
    exported = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow exports these to the environment; restore the user's, so the next config resolves its own store.
    for name, value in exported.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    experiment = mlflow.get_experiment_by_name(config.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the local store, not in ./mlruns
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return mlflow.create_experiment(config.mlflow.experiment, artifact_location=artifacts)


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = str(value)[:6000]


def end_abandoned_runs(config: PipelineConfig, experiment_id: str) -> list[str]:
    """End as FAILED the runs of this workspace still RUNNING from a job that was killed (no process ends them
    otherwise); called as a new pipeline, or a stage on its own, starts there. Returns their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    abandoned = [run for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
                 if run.data.tags.get("td_ray.workspace") == redacted(config.workspace)]
    for run in abandoned:
        client.set_tag(run.info.run_id, "td_ray.ended", "left RUNNING by a job that stopped; ended by the next run")
        client.set_terminated(run.info.run_id, "FAILED")
        logger.warning("mlflow: run %s (%s) was left RUNNING by a job that stopped: ended as FAILED", run.info.run_id,
                       run.data.tags.get("mlflow.runName", "?"))
    return [run.info.run_id for run in abandoned]


@contextlib.contextmanager
def pipeline_run(config: PipelineConfig) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its run id."""
    import mlflow

    experiment_id = configure(config)
    end_abandoned_runs(config, experiment_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as run:
        mlflow.set_tags({"td_ray.config_hash": config.fingerprint(), "td_ray.workspace": redacted(config.workspace)})
        shown = config.model_dump(mode="json") | {"workspace": redacted(config.workspace)}
        mlflow.log_text(yaml.safe_dump(shown, sort_keys=False), "config.yaml")
        params: dict[str, str] = {}
        _flatten("", shown, params)
        mlflow.log_params(params)  # the whole config, so runs compare and filter by any setting in the UI
        yield run.info.run_id


@dataclass
class StageRun:
    """A stage's MLflow run; once it ends, `usage` holds what the stage used (CPU-, GPU-seconds and -hours, start-up)
    and, with prices in the config's `cost`, what that cost."""

    run_id: str
    usage: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def stage_run(config: PipelineConfig, stage: str) -> Iterator[StageRun]:
    """A run for one stage: a child of the pipeline run when there is one. Logs the stage's config as params, and
    what the stage used (`StageRun.usage`) when it ends."""
    import mlflow

    experiment_id = configure(config)
    nested = mlflow.active_run() is not None
    if not nested:
        end_abandoned_runs(config, experiment_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=nested) as run:
        section = getattr(config, stage).model_dump(mode="json")
        params: dict[str, str] = {}
        _flatten(stage, section, params)
        mlflow.log_params(params)
        mlflow.set_tags({"td_ray.stage": stage, "td_ray.config_hash": config.fingerprint()})
        mlflow.log_text(yaml.safe_dump({stage: section}, sort_keys=False), f"{stage}_config.yaml")
        mlflow.set_tag("td_ray.workspace", redacted(config.workspace))
        usage, handle = StageUsage().start(), StageRun(run.info.run_id)
        try:
            yield handle
        finally:
            usage.stop()
            measured = usage.metrics()
            handle.usage = measured | usage_cost(measured["cpu_seconds"], measured["gpu_seconds"],
                                                 config.cost.model_dump())
        mlflow.log_metrics(handle.usage)


def log_input(source: DataSource, name: str, role: str, identity: str) -> None:
    """Log an input table on the active run (`mlflow.log_input`): its name, a digest of what identifies its
    content (`sources.fingerprint`, as recorded in the ingested table), and where it comes from: the ir_datasets
    page of its id, or its file."""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    if isinstance(source, IrDatasetsSource):
        origin = HTTPDatasetSource(f"https://ir-datasets.com/{source.id.split('/')[0]}.html#{source.id}")
    else:
        location = source.path if "://" in source.path else Path(source.path).absolute().as_uri()
        try:
            with warnings.catch_warnings():  # MLflow registers the local source type twice and says so each time
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                origin = resolve_dataset_source(location)
        except MlflowException:  # a scheme MLflow has no source type for
            origin = CodeDatasetSource({"path": location})
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    mlflow.log_input(MetaDataset(origin, name=name, digest=digest), context=role)


def log_result(result: StageResult) -> None:
    """Log a stage's rows, throughput and metrics to the active run."""
    import mlflow

    mlflow.log_metrics(
        {"rows": float(result.rows), "seconds": result.seconds, "rows_per_s": result.throughput}
        | {metric_key(name): value for name, value in result.metrics.items()}
    )
    mlflow.set_tags({f"td_ray.output.{name}": path for name, path in result.outputs.items()})


def log_workspace_artifact(workspace: Workspace, location: str) -> None:
    """Log a workspace file as an artifact of the active run (copied out of an object store first)."""
    import tempfile

    import mlflow

    if workspace.is_local:
        mlflow.log_artifact(location)
        return
    path = location.split("://", 1)[-1]
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / path.rsplit("/", 1)[-1]
        with workspace.fs.open_input_stream(path) as handle:
            local.write_bytes(handle.read())
        mlflow.log_artifact(str(local))
