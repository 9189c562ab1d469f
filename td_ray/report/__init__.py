"""report: one self-contained HTML page per workspace (`{workspace}/report/report.html`, its PNGs beside it).

Per stage: rows, seconds, throughput, tokens/s, CPU- and GPU-seconds and start-up time; translation quality flags
per language; the teacher's score distribution; the training loss and learning rate from MLflow's step history;
the evaluation before and after training with a per-topic plot; lineage and where every output is. A stage that has
not run is left out. `td-ray report --workspace W` writes it; `run` and `demo` write it at the end. It is logged to
the pipeline's MLflow run as the `report` artifact folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

from td_ray.report.collect import ReportData, collect
from td_ray.report.render import render
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

__all__ = ["ReportData", "collect", "write_report"]

REPORT_DIR = "report"


def write_report(workspace_root: str, tracking_uri: str, parent_run_id: str | None = None) -> Path:
    """Collect, render into `{workspace}/report/`, and log it to the pipeline run; returns the page's path."""
    from mlflow import MlflowClient

    data = collect(workspace_root, tracking_uri, parent_run_id)
    directory = Workspace(workspace_root).local_dir(REPORT_DIR)
    path = render(data, directory)
    if data.parent_run_id is not None:
        MlflowClient(tracking_uri).log_artifacts(data.parent_run_id, str(directory), REPORT_DIR)
    logger.info("report: %s (%d stages, logged to run %s)", path, len(data.stages), data.parent_run_id or "none")
    return path
