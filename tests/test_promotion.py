"""Registry promotion: each distilled version is tagged with its evaluation, and `mlflow.promote.alias` moves only to
a version that beats the alias's on the same evaluation, in a real MLflow registry (sqlite)."""
from __future__ import annotations

import pytest

from conftest import with_updates
from td_ray.result import StageResult


@pytest.fixture
def registry(make_workspace, tmp_path):
    """A config with promotion on nDCG@20, its evaluation tables ingested, and an MLflow client on its store with
    a function that registers a new version (a bare directory: promotion reads only tags)."""
    from mlflow import MlflowClient

    from td_ray import tracking
    from td_ray.sources import ingest
    from td_ray.workspace import Workspace

    config = make_workspace(mlflow={"promote": {"metric": "nDCG@20", "alias": "champion", "min_delta": 0.01}})
    workspace = Workspace(config.workspace)
    for source, kind, name in ((config.data.eval_docs, "docs", "eval_docs"),
                               (config.data.eval_topics, "queries", "eval_topics"),
                               (config.data.eval_qrels, "qrels", "eval_qrels")):
        ingest(workspace, source, kind, name)
    tracking.configure(config)
    client = MlflowClient(tracking.tracking_uri(config))
    name = config.mlflow.registered_model
    client.create_registered_model(name)
    (tmp_path / "model").mkdir()

    def register() -> str:
        return client.create_model_version(name, str(tmp_path / "model")).version

    return config, client, register


def results(version: str, ndcg: float, unchanged: bool = False) -> list[StageResult]:
    distilled = {"model_version": float(version)} | ({"unchanged": 1.0} if unchanged else {})
    return [StageResult("distill", 1, 1.0, metrics=distilled),
            StageResult("evaluate", 16, 1.0, metrics={"nDCG@20": ndcg, "R@100": 0.5, "RR@10": 0.4})]


def champion(client, config) -> str:
    return client.get_model_version_by_alias(config.mlflow.registered_model, "champion").version


def test_the_alias_moves_only_to_a_better_student_on_the_same_evaluation(registry):
    from td_ray.pipeline import _promote
    from td_ray.promotion import EVALUATION_TAG, METRIC_TAG

    config, client, register = registry
    first = register()
    _promote(config, results(first, 0.40))  # no champion yet: the first evaluated version is one
    assert champion(client, config) == first
    tags = client.get_model_version(config.mlflow.registered_model, first).tags
    assert float(tags[METRIC_TAG + "nDCG_20"]) == 0.40 and len(tags[EVALUATION_TAG]) > 8

    second = register()
    _promote(config, results(second, 0.405))  # better, but not by min_delta 0.01
    assert champion(client, config) == first
    assert float(client.get_model_version(config.mlflow.registered_model, second).tags[METRIC_TAG + "nDCG_20"]) \
        == 0.405  # tagged all the same

    third = register()
    _promote(config, results(third, 0.60, unchanged=True))  # a rerun that changed nothing moves no alias
    assert champion(client, config) == first

    other = with_updates(config, evaluate={"depth": 100, "passage_depth": 250})  # another evaluation
    fourth = register()
    _promote(other, results(fourth, 0.90))
    assert champion(client, config) == first  # not compared with the champion's evaluation

    fifth = register()
    _promote(config, results(fifth, 0.45))
    assert champion(client, config) == fifth


def test_a_version_is_promoted_by_hand_and_a_promoted_measure_must_be_evaluated(registry, capsys):
    from td_ray.cli import _promote_by_hand
    from td_ray.config import ConfigError, parse_config

    config, client, register = registry
    version = register()
    assert _promote_by_hand(config, version) == 0 and champion(client, config) == version
    assert f"@champion -> version {version}" in capsys.readouterr().out
    raw = config.model_dump(mode="json")
    raw["mlflow"]["promote"] = {"metric": "MAP"}
    with pytest.raises(ConfigError, match="mlflow.promote.metric 'MAP' is not evaluated; add it to evaluate.measures"):
        parse_config(raw)
