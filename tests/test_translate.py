"""translate: CTranslate2 actors on Ray Data, pre-translated targets, and the errors a user can hit."""
from __future__ import annotations

import shutil
from pathlib import Path

import ctranslate2
import pyarrow.parquet as pq
import pytest

from conftest import REALDATA
from td_ray import translate
from td_ray.sources import SourceError
from td_ray.translate.core import DecodingOptions, ModelError, SentencePieceCodec, translate_texts
from td_ray.workspace import Workspace, translated


def test_every_id_once_per_language_with_text_and_model(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    english = set(workspace.read_table("inputs/passages.parquet")["id"].to_pylist())
    for target in config.translate.targets:
        table = workspace.read_table(translated("passages", target.lang))
        ids = table["id"].to_pylist()
        assert len(ids) == len(set(ids)) == len(english)
        assert set(ids) == english
        assert set(table["lang"].to_pylist()) == {target.lang}
        assert all(text.strip() for text in table["text"].to_pylist())
        expected_model = target.model or "pretranslated:passages.syn.tsv"
        assert set(table["mt_model"].to_pylist()) == {expected_model}


def test_mt_queries_translated_and_pretranslated_text_kept(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    queries = workspace.read_table(translated("queries", "xx"))
    assert queries.num_rows == workspace.read_table("inputs/train_queries.parquet").num_rows
    syn = dict(zip(*(workspace.read_table(translated("passages", "syn"))[c].to_pylist() for c in ("id", "text"))))
    source = dict(line.split("\t", 1) for line in (Path(config.workspace) / "demo" / "passages.syn.tsv").read_text().splitlines())
    assert syn == source


@pytest.fixture(scope="module")
def ct2_model(assets_root):
    model_dir = assets_root / "tiny-models" / "marian_ct2"
    return ctranslate2.Translator(str(model_dir), device="cpu"), SentencePieceCodec(model_dir)


def test_translate_texts_matches_the_bare_engine_and_keeps_empty_rows(ct2_model):
    translator, codec = ct2_model
    texts = ["Balto mirek dusa.", "", "   ", "Fobe kanu lete rima sote."]
    options = DecodingOptions(max_decoding_length=12)
    results = translate_texts(translator, codec, texts, options)
    assert [item.text for item in results][1:3] == ["", ""]
    bare = translator.translate_batch([codec.source.encode(t, out_type=str) + ["</s>"] for t in (texts[0], texts[3])],
                                      max_decoding_length=12)
    assert results[0].text == codec.decode(bare[0].hypotheses[0])
    assert results[3].text == codec.decode(bare[1].hypotheses[0])
    assert results[0].target_tokens == 12 and results[0].source_tokens > 1


def test_long_input_is_cut_and_counted(ct2_model):
    translator, codec = ct2_model
    results = translate_texts(translator, codec, ["balto " * 500], DecodingOptions(max_input_length=16, max_decoding_length=4))
    assert results[0].truncated and results[0].source_tokens == 16


def test_bad_model_fails_before_any_actor(make_workspace, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    config = make_workspace(translate={"targets": [{"lang": "xx", "model": str(empty)}]}, distill={"passage_lang": "xx"})
    with pytest.raises(ModelError, match="not-a-model"):
        translate.run(config)
    assert not (Path(config.workspace) / "translate").exists()


def test_model_without_sentencepiece_files_is_named(make_workspace, assets_root, tmp_path):
    broken = tmp_path / "ct2-no-spm"
    shutil.copytree(assets_root / "tiny-models" / "marian_ct2", broken)
    (broken / "source.spm").unlink()
    config = make_workspace(translate={"targets": [{"lang": "xx", "model": str(broken)}]}, distill={"passage_lang": "xx"})
    with pytest.raises(ModelError, match="source.spm"):
        translate.run(config)


def test_pretranslated_collection_missing_ids_is_an_error(make_workspace, assets_root, tmp_path):
    partial = tmp_path / "partial.syn.tsv"
    lines = (assets_root / "demo" / "passages.syn.tsv").read_text().splitlines()
    partial.write_text("\n".join(lines[:-2]) + "\n")
    config = make_workspace(translate={"targets": [{"lang": "syn", "pretranslated": {"format": "tsv", "path": str(partial)}}]})
    with pytest.raises(SourceError, match="lacks 2 of the English ids"):
        translate.run(config)


@pytest.mark.skipif(not (REALDATA / "msmarco" / "passages.tsv").is_file(), reason="../shared/realdata is absent")
def test_real_msmarco_passages_translate_exactly_once(make_workspace, assets_root, ray_cluster):
    config = make_workspace(
        data={"passages": {"format": "tsv", "path": str(REALDATA / "msmarco" / "passages.tsv"), "header": True,
                           "id_column": "pid", "text_column": "text"}},
        translate={"targets": [{"lang": "xx", "model": str(assets_root / "tiny-models" / "marian_ct2")}],
                   "translate_queries": False, "max_input_length": 64, "max_decoding_length": 8},
        distill={"passage_lang": "xx"},
    )
    result = translate.run(config)
    table = pq.read_table(Path(config.workspace) / "translate" / "passages.xx.parquet")
    source_ids = [line.split("\t")[0] for line in (REALDATA / "msmarco" / "passages.tsv").read_text().splitlines()[1:]]
    assert sorted(table["id"].to_pylist()) == sorted(source_ids)
    assert all(table["text"].to_pylist())
    assert result.metrics["truncated"] >= 1  # the sample holds passages longer than 64 tokens
