"""Config errors name the field and the fix; nothing runs on a broken config."""
from __future__ import annotations

import pytest
import yaml

from td_ray.cli import main
from td_ray.config import ConfigError, load_config, parse_config
from td_ray.pipeline import demo_config, run_pipeline


@pytest.fixture
def raw(tmp_path):
    return demo_config(str(tmp_path / "ws")).model_dump(mode="json")


def _error(raw, tmp_path) -> str:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_unknown_key_is_named(raw, tmp_path):
    raw["distill"]["learning_rate"] = 0.1
    assert "distill.learning_rate: Extra inputs are not permitted" in _error(raw, tmp_path)


def test_wrong_type_and_bad_value_are_named(raw, tmp_path):
    raw["distill"]["steps"] = "many"
    raw["index"]["num_shards"] = 0
    message = _error(raw, tmp_path)
    assert "distill.steps: Input should be a valid integer" in message
    assert "index.num_shards: Input should be greater than or equal to 1" in message


def test_missing_section_and_unknown_source_format(raw, tmp_path):
    del raw["score"]
    raw["data"]["passages"] = {"format": "csv", "path": "x.csv"}
    message = _error(raw, tmp_path)
    assert "score: Field required" in message
    assert "data.passages" in message and "'csv'" in message


def test_language_rules(raw, tmp_path):
    raw["distill"]["passage_lang"] = "de"
    assert "distill.passage_lang: 'de' is not `en` nor a translate target" in _error(raw, tmp_path)
    raw["distill"]["passage_lang"] = "syn"
    raw["translate"]["targets"][1]["pretranslated"] = {"format": "tsv", "path": "x"}
    assert "set exactly one of `model` or `pretranslated`" in _error(raw, tmp_path)
    raw["translate"]["targets"][1] = {"lang": "zn", "model": "x"}  # a typo for zh
    assert "lang 'zn' is not a known language code" in _error(raw, tmp_path)


def test_translate_options_are_checked(raw, tmp_path):
    raw["translate"]["compute_type"] = "float8"
    assert "translate.compute_type" in _error(raw, tmp_path)
    raw["translate"]["compute_type"] = "int8_float16"
    raw["translate"]["num_actors"], raw["translate"]["max_actors"] = 4, 2
    assert "max_actors (2) must be at least num_actors (4)" in _error(raw, tmp_path)


def test_not_yaml_not_a_mapping_and_no_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workspace: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a", "list"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("workspace: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_missing_input_paths_are_named_before_any_stage_runs(raw, tmp_path):
    config = parse_config(raw | {"demo_assets": False})
    with pytest.raises(ConfigError, match=r"data.passages.path: .*/demo/passages.tsv"):
        run_pipeline(config)
    assert not (tmp_path / "ws" / "inputs").exists() and not (tmp_path / "ws" / "mlflow").exists()


def test_cli_prints_one_clear_line_and_exits_2(raw, tmp_path, capsys):
    raw["evaluate"]["depth"] = -5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "td-ray: error: invalid config" in err and "evaluate.depth" in err and "Traceback" not in err


def test_score_needs_a_teacher_or_a_score_file_and_a_sound_template(raw, tmp_path):
    raw["score"]["import_scores"] = {"format": "colbertx", "path": "scores.jsonl"}
    assert "set exactly one of `teacher`" in _error(raw, tmp_path)
    del raw["score"]["import_scores"]
    raw["score"].update(teacher_kind="seq2seq", template="Query: {query} Relevant:")
    assert "must contain {query} and {document}" in _error(raw, tmp_path)


def test_an_alias_bomb_and_an_oversized_file_are_refused_at_once(tmp_path):
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for this, previous in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{this}: &{this} [{', '.join(['*' + previous] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nworkspace: /tmp/x\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"expands to more than 100,000 values through its YAML aliases"):
        load_config(bomb)
    assert time.perf_counter() - started < 1.0
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * 1_100_000 + "\nworkspace: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"huge.yaml is 1,100,0\d\d bytes, above the 1,000,000 a config may have"):
        load_config(huge)
