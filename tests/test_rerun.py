"""Re-runs: a pipeline whose inputs and settings are unchanged skips the work of every stage and says so."""
from __future__ import annotations

import json
from pathlib import Path

from td_ray.distill import TRAINED_FILE
from td_ray.pipeline import run_pipeline
from td_ray.retrieval.layout import build_path, read_index_meta
from td_ray.workspace import RUN, SCORES, STUDENT_DIR, Workspace, translated


def test_a_rerun_with_nothing_changed_skips_every_stage_and_rewrites_nothing(pipeline_run):
    config, first = pipeline_run
    root = Path(config.workspace)
    meta = read_index_meta(Workspace(config.workspace))
    outputs = [root / translated("passages", "syn"), root / translated("passages", "qaa"), root / SCORES,
               root / STUDENT_DIR / TRAINED_FILE, root / RUN]
    outputs += [build_path(Workspace(config.workspace), meta, name) for name in meta["files"]]
    written = {path: path.stat().st_mtime_ns for path in outputs}
    again = {result.stage: result for result in run_pipeline(config)}
    manifest = json.loads(Path(again["translate"].outputs["manifest"]).read_text())
    assert manifest["entries"] and all(entry["unchanged"] for entry in manifest["entries"])
    assert again["translate"].rows == 0
    for stage in ("score", "distill", "index"):
        assert again[stage].metrics["unchanged"] == 1.0, stage
    assert again["distill"].metrics["model_version"] == first["distill"].metrics["model_version"]
    assert again["evaluate"].metrics == first["evaluate"].metrics
    assert {path: path.stat().st_mtime_ns for path in outputs} == written
