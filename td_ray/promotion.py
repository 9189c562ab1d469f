"""Registry promotion: a student's evaluation is tagged on its registered version, and an alias (``champion``) moves
to it only when it beats the alias's version on the same evaluation. Shared by the pipeline and `td-ray promote`."""
from __future__ import annotations

import logging

from td_ray.config import PipelineConfig, PromoteConfig
from td_ray.fingerprint import digest
from td_ray.retrieval.layout import POOL_SETTINGS
from td_ray.tracking import metric_key
from td_ray.workspace import EVAL_DOCS, EVAL_QRELS, EVAL_TOPICS, Workspace

logger = logging.getLogger(__name__)

EVALUATION_TAG = "td_ray.evaluation"
"""Version tag: the key of the evaluation its metrics come from (`evaluation_key`)."""
METRIC_TAG = "td_ray.eval."
"""Version tag prefix of each measure's value (``td_ray.eval.nDCG_20``: MLflow names cannot hold `@`)."""


def evaluation_key(config: PipelineConfig) -> str:
    """What makes two students' measures comparable: the documents, topics and qrels as ingested, the index and
    search settings (the student left out) and the measures."""
    workspace = Workspace(config.workspace)
    index = {name: value for name, value in config.index.model_dump(mode="json").items()
             if name not in POOL_SETTINGS and name != "model"}
    return digest(*(workspace.table_identity(table) for table in (EVAL_DOCS, EVAL_TOPICS, EVAL_QRELS)), index,
                  config.evaluate.model_dump(mode="json"))


def tag_evaluation(client, name: str, version: str, key: str, metrics: dict[str, float]) -> None:
    """Record on the version which evaluation it had and its measures."""
    client.set_model_version_tag(name, version, EVALUATION_TAG, key)
    for measure, value in metrics.items():
        client.set_model_version_tag(name, version, METRIC_TAG + metric_key(measure), repr(float(value)))


def promote(client, name: str, version: str, promote_config: PromoteConfig) -> bool:
    """Move the alias to `version` if its tagged measure beats the alias's version on the same evaluation by more
    than min_delta (or no version holds the alias yet); returns whether it moved. A version evaluated otherwise than
    the alias's is not compared: the alias stays, and the log says how to promote by hand."""
    from mlflow.exceptions import MlflowException

    alias, measure = promote_config.alias, promote_config.metric
    tag = METRIC_TAG + metric_key(measure)
    new = client.get_model_version(name, version)
    if tag not in new.tags:
        raise ValueError(f"version {version} of {name} has no {measure} evaluation tagged; evaluate it first")
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    value = float(new.tags[tag])
    if current is not None and current.version != str(version):
        if current.tags.get(EVALUATION_TAG) != new.tags.get(EVALUATION_TAG):
            logger.warning("promote: @%s (version %s) was evaluated otherwise than version %s (other documents, "
                           "topics, qrels or settings): not compared, @%s stays; `td-ray promote --version %s` moves "
                           "it by hand", alias, current.version, version, alias, version)
            return False
        best = float(current.tags.get(tag, "-inf"))
        if value <= best + promote_config.min_delta:
            logger.info("promote: version %s (%s %.4f) does not beat @%s, version %s (%.4f) by more than %g; @%s "
                        "stays", version, measure, value, alias, current.version, best, promote_config.min_delta,
                        alias)
            return False
    client.set_registered_model_alias(name, alias, str(version))
    logger.info("promote: @%s -> version %s of %s (%s %.4f)", alias, version, name, measure, value)
    return True
