"""report: one self-contained HTML page per workspace (`{workspace}/report/report.html`, its PNGs beside it).

Per stage: rows, seconds, throughput, tokens/s, CPU- and GPU-seconds and start-up time; translation quality flags
per language; the teacher's score distribution; the training loss and learning rate from MLflow's step history;
the evaluation before and after training with a per-topic plot; lineage and where every output is. A stage that has
not run is left out. `td-ray report --workspace W` writes it; `run` and `demo` write it at the end. It is logged to
the pipeline's MLflow run as the `report` artifact folder.
"""
from __future__ import annotations

import logging

from td_ray.report.collect import ReportData, collect
from td_ray.report.render import render
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

__all__ = ["ReportData", "collect", "write_report"]

REPORT_DIR = "report"


def write_report(workspace_root: str, tracking_uri: str, parent_run_id: str | None = None) -> str:
    """Collect, render into `{workspace}/report/` (on an object store: rendered on this node's disk, then uploaded),
    and log it to the pipeline run; returns where the page is."""
    from mlflow import MlflowClient

    data = collect(workspace_root, tracking_uri, parent_run_id)
    workspace = Workspace(workspace_root)
    directory = workspace.local_dir(REPORT_DIR)
    path = render(data, directory)
    workspace.upload(directory, REPORT_DIR)
    if data.parent_run_id is not None:
        MlflowClient(tracking_uri).log_artifacts(data.parent_run_id, str(directory), REPORT_DIR)
    where = workspace.location(f"{REPORT_DIR}/{path.name}")
    logger.info("report: %s (%d stages, logged to run %s)", where, len(data.stages), data.parent_run_id or "none")
    return where
