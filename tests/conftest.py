"""Shared fixtures: one local Ray cluster, the tiny models and one small pipeline run for the whole session.

Ray and TorchTrainer start-up costs seconds each, so the stage tests share a single pipeline run and
assert on its outputs; tests that need other settings run single stages on their own workspaces.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def with_updates(config, **sections):
    """A copy of a PipelineConfig with fields of its sections replaced, e.g. distill={"steps": 4}."""
    from td_ray.config import PipelineConfig

    raw = config.model_dump(mode="json")
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return PipelineConfig.model_validate(raw)


def start_session_ray() -> None:
    """The session's in-process Ray cluster (tests that start clusters of their own stop it, then call this)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    start_session_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def assets_root(tmp_path_factory) -> Path:
    """Tiny models and demo data built once, as the demo builds them (so a demo run over a workspace linking to
    them finds them complete), shared by every workspace through symlinks."""
    from td_ray.pipeline import demo_config, prepare_demo_assets

    root = tmp_path_factory.mktemp("assets")
    prepare_demo_assets(demo_config(str(root)))
    return root


@pytest.fixture
def make_workspace(tmp_path_factory, assets_root):
    """A fresh workspace holding links to the shared tiny models and demo data; returns its demo config."""
    from td_ray.pipeline import demo_config

    def make(**sections):
        workspace = tmp_path_factory.mktemp("ws")
        for name in ("tiny-models", "demo"):
            (workspace / name).symlink_to(assets_root / name)
        config = demo_config(str(workspace))
        return with_updates(config, demo_assets=False, **sections)

    return make


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, assets_root, ray_cluster):
    """The demo pipeline, run once in this process with the demo's own settings: (config, results by stage).
    test_demo then submits the demo job over the same workspace, as a re-run."""
    from td_ray.pipeline import demo_config, run_pipeline

    workspace = tmp_path_factory.mktemp("pipeline")
    for name in ("tiny-models", "demo"):
        (workspace / name).symlink_to(assets_root / name)
    config = with_updates(demo_config(str(workspace)), demo_assets=False)
    results = run_pipeline(config)
    return config, {result.stage: result for result in results}


@pytest.fixture(scope="session")
def colbert_student(assets_root, tmp_path_factory) -> Path:
    """A lexical ColBERT student (`build_lexical_student`, projected to 32 dimensions): the untrained tiny student's
    scores nearly tie (its top 10 spread over 2 % of the score), so any quantisation reshuffles them; this one
    ranks by content, as a trained student does."""
    from td_ray.assets.tiny_models import build_lexical_student
    from td_ray.encoders.colbert import ColBERTSpec, load_colbert

    root = tmp_path_factory.mktemp("lexical")
    words = build_lexical_student(assets_root / "tiny-models" / "student", root / "bert")
    model, colbert_tokenizer = load_colbert(words, ColBERTSpec(dim=32, query_maxlen=8, doc_maxlen=64))
    model.save_pretrained(root / "student", colbert_tokenizer)
    return root / "student"
