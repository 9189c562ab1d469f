"""`validate` and `run` catch, before any stage runs, the config mistakes that would cost hours or pass silently:
each finding names the field and the fix."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import with_updates

from td_ray.config import ConfigError, parse_config
from td_ray.preflight import check_config


def _messages(config, severity: str = "error") -> list[str]:
    return [str(finding) for finding in check_config(config) if finding.severity == severity]


def test_the_demo_config_has_no_finding(make_workspace):
    assert check_config(make_workspace()) == []


def test_a_missing_input_file_is_named_with_its_field(make_workspace, tmp_path):
    config = make_workspace(data={"passages": {"format": "tsv", "path": str(tmp_path / "colection.tsv")}})
    assert _messages(config) == [f"error: data.passages.path: {tmp_path / 'colection.tsv'} does not exist; correct the "
                                 "path (a relative one is read from the directory td-ray runs in; `{workspace}` "
                                 "stands for the workspace root)"]


def test_model_references_must_exist_locally_or_be_hub_ids(make_workspace, tmp_path):
    config = make_workspace(score={"teacher": "castorini/monot5 3b"}, distill={"student": str(tmp_path / "nothing")},
                            index={"model": "models:/td-ray-student@champion"})
    assert _messages(config) == [
        "error: score.teacher: 'castorini/monot5 3b' is neither an existing directory nor a hub id (owner/name: "
        "letters, digits, `-`, `_` and `.`); correct it",
        f"error: distill.student: the directory {tmp_path / 'nothing'} does not exist; correct the path, or name a hub "
        "model as owner/name",
    ]
    assert _messages(make_workspace(score={"teacher": "cross-encoder/ms-marco-MiniLM-L6-v2"})) == []


def test_ir_datasets_ids_roles_and_fields_are_checked_offline(make_workspace):
    wrong_id = make_workspace(data={"eval_docs": {"format": "ir_datasets", "id": "neuclir/1/zh/trec-2021"}})
    [message] = _messages(wrong_id)
    assert message.startswith("error: data.eval_docs.id: 'neuclir/1/zh/trec-2021' is not an ir_datasets id (they are "
                              "listed at https://ir-datasets.com); did you mean ")
    assert "'neuclir/1/zh/trec-2022'" in message and message.endswith("?")
    misspelt = make_workspace(data={"eval_docs": {"format": "ir_datasets", "id": "neuclir/1/zh",
                                                  "text_fields": ["titel", "text"]}})
    [message] = _messages(misspelt)
    assert message.startswith("error: data.eval_docs.text_fields: 'neuclir/1/zh' docs have no field 'titel'; set "
                              "text_fields to some of ['title', 'text'")
    assert message.endswith("; did you mean 'title'?")
    topics = make_workspace(data={"eval_topics": {"format": "ir_datasets", "id": "neuclir/1/zh/trec-2022"}})
    [message] = _messages(topics)  # NeuCLIR topics have title, description and narrative, but no `text`
    assert message.startswith("error: data.eval_topics: 'neuclir/1/zh/trec-2022' queries have no field 'text'")
    assert "set text_fields to some of ['title', 'description', 'narrative'" in message and "did you" not in message
    no_qrels = make_workspace(data={"eval_qrels": {"format": "ir_datasets", "id": "neuclir/1/zh"}})
    assert _messages(no_qrels) == ["error: data.eval_qrels.id: 'neuclir/1/zh' has no qrels (it has docs); name a "
                                   "dataset that provides the qrels, e.g. a subset of it"]


def test_candidates_from_scoreddocs_are_a_warning(make_workspace):
    config = make_workspace(data={"candidates": {"format": "ir_datasets", "id": "msmarco-passage/train"}})
    assert _messages(config) == []
    [warning] = _messages(config, "warning")
    assert warning.startswith("warning: data.candidates: candidates from 'msmarco-passage/train' scoreddocs")
    assert "prefer a TREC run of your first-stage retriever (format: trec_run)" in warning


def test_an_unknown_measure_is_named_with_a_suggestion(make_workspace):
    [message] = _messages(make_workspace(evaluate={"measures": ["nDCG@20", "MAPP"]}))
    assert message.startswith("error: evaluate.measures: 'MAPP' is not an ir_measures measure (")
    assert "; use names such as nDCG@20, R@100, RR@10, AP" in message


def test_nway_beyond_the_teachers_top_k_is_refused_before_anything_is_paid_for(make_workspace):
    config = make_workspace(score={"top_k": 50}, distill={"nway": 60})
    assert _messages(config) == ["error: distill.nway: 60 passages per query, but score.top_k keeps 50 candidates per "
                                 "query: every query would be dropped after translate and score have run; lower "
                                 "distill.nway to at most 50 or raise score.top_k"]


def test_run_stops_on_errors_before_ray_starts(make_workspace):
    import ray

    from td_ray.pipeline import run_pipeline

    config = make_workspace(score={"top_k": 5})
    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"cannot run as it is:\n  error: distill.nway: 10 passages per query"):
        run_pipeline(config, ["translate"])
    assert ray.is_initialized() == was_running


def test_unknown_fields_and_choices_get_a_did_you_mean(make_workspace):
    raw = make_workspace().model_dump(mode="json")
    raw["distill"]["passage_maxlne"] = 96
    raw["data"]["passages"]["duplicates"] = "keep_frist"
    with pytest.raises(ConfigError) as raised:
        parse_config(raw)
    assert "distill.passage_maxlne: Extra inputs are not permitted; did you mean 'passage_maxlen'?" in str(raised.value)
    assert "; did you mean 'keep_first'?" in str(raised.value)


def test_a_bad_factory_with_no_known_dimension_names_no_made_up_one(make_workspace):
    with pytest.raises(Exception) as raised:
        with_updates(make_workspace(), index={"factory": "IVF4,Flatt"}, distill={"student": "BAAI/bge-m3"})
    assert "is not a FAISS factory string (" in str(raised.value) and "dimension" not in str(raised.value)


def test_validate_prints_findings_and_exits_1_without_faiss_noise(make_workspace, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_workspace().model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "td_ray.cli", "validate", "--config", str(path),
                           "--set", "distill.nway=60", "--set", "score.top_k=50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "\n  nway: 60\n" in done.stdout  # the overrides are in the config it prints
    assert "error: distill.nway: 60 passages per query" in done.stderr
    assert f"{path}: 1 error(s), 0 warning(s)" in done.stderr
    assert "faiss" not in done.stderr.lower() and "INFO" not in done.stderr


def test_a_set_override_that_is_not_key_equals_value_names_the_fix(make_workspace, tmp_path):
    from td_ray.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_workspace().model_dump(mode="json")))
    with pytest.raises(ConfigError, match=r"--set 'distill.steps': write KEY=VALUE with a dotted key"):
        load_config(path, overrides=["distill.steps"])
    with pytest.raises(ConfigError, match=r"distill.nway is a value, not a section"):
        load_config(path, overrides=["distill.nway.x=1"])
    assert load_config(path, overrides=["distill.steps=7", "evaluate.measures=[AP]"]).distill.steps == 7
