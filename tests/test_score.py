"""score: one finite raw teacher logit per (query, candidate), in English or against translated passages."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from conftest import with_updates
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from td_ray import score, translate
from td_ray.assets.demo_data import DemoSizes
from td_ray.errors import ModelError
from td_ray.score.core import CrossEncoderTeacher
from td_ray.textjoin import MissingTextError
from td_ray.workspace import RUN, RUN_TREC, SCORES, STUDENT_DIR, Workspace, translated


def _direct_logits(model_dir: str, queries: list[str], passages: list[str], max_length: int) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        encoded = tokenizer(queries, passages, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**encoded).logits[:, 0].tolist()


def test_one_finite_score_per_pair_equal_to_the_teacher_logit(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    scores = workspace.read_table(SCORES)
    candidates = workspace.read_table("inputs/candidates.parquet")
    keys = list(zip(scores["qid"].to_pylist(), scores["pid"].to_pylist()))
    assert len(keys) == len(set(keys)) == candidates.num_rows  # demo candidate lists are exactly top_k long
    assert all(math.isfinite(value) for value in scores["score"].to_pylist())
    assert set(scores["teacher"].to_pylist()) == {config.score.teacher}

    queries = dict(zip(*(workspace.read_table("inputs/train_queries.parquet")[c].to_pylist() for c in ("id", "text"))))
    passages = dict(zip(*(workspace.read_table("inputs/passages.parquet")[c].to_pylist() for c in ("id", "text"))))
    sample = keys[:40]
    expected = _direct_logits(config.score.teacher, [queries[q] for q, _ in sample], [passages[p] for _, p in sample],
                              config.score.max_length)
    assert scores["score"].to_pylist()[:40] == pytest.approx(expected, abs=1e-4)
    assert len({round(value, 4) for value in expected}) > 10  # the teacher really discriminates pairs


@pytest.mark.parametrize(("query_lang", "passage_lang"), [("en", "syn"), ("qaa", "qaa")])
def test_clir_teacher_scores_translated_passages(pipeline_run, make_workspace, ray_cluster, query_lang, passage_lang):
    """English query x translated passage, and translated x translated (the CT2 target translates queries too, when
    translate_queries asks for it; the demo does not)."""
    config, _ = pipeline_run
    mt_target = [target.model_dump(mode="json") for target in config.translate.targets if target.lang == "qaa"]
    translating = ({"translate": {"translate_queries": True, "targets": mt_target}, "distill": {"passage_lang": "qaa"}}
                   if query_lang != "en" else {})
    clir = make_workspace(score={"passage_lang": passage_lang, "query_lang": query_lang}, **translating)
    workspace = Workspace(clir.workspace)
    shared = Workspace(config.workspace)
    if query_lang == "en":  # reuse the shared run's translation so only the score stage runs here
        workspace.write_table(shared.read_table(translated("passages", passage_lang)), translated("passages", passage_lang))
    else:
        translate.run(clir)
    score.run(clir)
    scores = workspace.read_table(SCORES)
    first = scores.slice(0, 8)
    queries = dict(zip(*(workspace.read_table(translated("queries", query_lang))[c].to_pylist() for c in ("id", "text"))))
    passages = dict(zip(*(workspace.read_table(translated("passages", passage_lang))[c].to_pylist() for c in ("id", "text"))))
    expected = _direct_logits(clir.score.teacher, [queries[q] for q in first["qid"].to_pylist()],
                              [passages[p] for p in first["pid"].to_pylist()], clir.score.max_length)
    assert first["score"].to_pylist() == pytest.approx(expected, abs=1e-4)
    english = shared.read_table(SCORES).slice(0, 8)
    assert english["score"].to_pylist() != pytest.approx(first["score"].to_pylist(), abs=1e-4)
    made = json.loads(workspace.file_metadata(SCORES)["td_ray_provenance"])
    assert (made["query_lang"], made["passage_lang"]) == (query_lang, passage_lang)


def test_a_killed_run_resumes_from_its_committed_blocks_and_an_unchanged_one_is_skipped(make_workspace, ray_cluster):
    config = make_workspace(score={"top_k": 3})
    workspace = Workspace(config.workspace)
    first = score.run(config)
    scores = workspace.read_table(SCORES)
    assert first.metrics["scored_pairs"] == scores.num_rows == first.rows
    # a run killed after committing the blocks of the first 200 pairs: their block files, and no score table
    identities = [workspace.table_identity(table) for table in (
        "inputs/candidates.parquet", "inputs/train_queries.parquet", "inputs/passages.parquet")]
    key = score.inputs_key(config.score, identities)
    workspace.commit_block(f"{score.BLOCKS}/{key}", scores.slice(0, 200), scores.schema, ["qid", "pid"])
    Path(workspace.path(SCORES)).unlink()
    resumed = score.run(config)
    assert (resumed.metrics["scored_pairs"], resumed.metrics["resumed_pairs"]) == (scores.num_rows - 200, 200)
    again = workspace.read_table(SCORES)
    want = {(q, p): v for q, p, v in zip(*(scores[c].to_pylist() for c in ("qid", "pid", "score")))}
    got = {(q, p): v for q, p, v in zip(*(again[c].to_pylist() for c in ("qid", "pid", "score")))}
    assert got.keys() == want.keys()  # every pair once; a pair's score only varies with its batch's padding
    assert [got[pair] for pair in want] == pytest.approx(list(want.values()), abs=1e-5)
    assert not Path(workspace.path(score.BLOCKS), key).exists()  # the blocks go once the table is committed
    made = Path(workspace.path(SCORES)).stat().st_mtime_ns
    assert score.run(config).metrics["unchanged"] == 1.0 and Path(workspace.path(SCORES)).stat().st_mtime_ns == made
    assert score.inputs_key(with_updates(config, score={"top_k": 2}).score, identities) != key  # scores again


def test_pairs_whose_passage_has_no_text_are_named(make_workspace, assets_root, ray_cluster, tmp_path):
    partial = tmp_path / "passages.tsv"
    lines = (assets_root / "demo" / "passages.tsv").read_text().splitlines()
    partial.write_text("\n".join(lines[:-5]) + "\n")
    config = make_workspace(data={"passages": {"format": "tsv", "path": str(partial)}})
    with pytest.raises(MissingTextError, match=r"no text for passage '.+'.*the candidates, the training queries"):
        score.run(config)
    assert not Workspace(config.workspace).exists(SCORES)


def test_teacher_with_several_labels_is_rejected(make_workspace, tmp_path, assets_root):
    model = AutoModelForSequenceClassification.from_pretrained(assets_root / "tiny-models" / "cross_encoder", num_labels=2,
                                                               ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "two-labels")
    config = make_workspace(score={"teacher": str(tmp_path / "two-labels")})
    with pytest.raises(ModelError, match="2 output labels"):
        score.run(config)


def test_a_monot5_style_teacher_scores_through_the_stage(make_workspace, ray_cluster, tmp_path):
    from td_ray.assets.tiny_t5 import build_tiny_t5
    from td_ray.score.seq2seq import Seq2SeqTeacher

    t5 = str(build_tiny_t5(tmp_path / "t5"))
    config = make_workspace(score={"teacher": t5, "teacher_kind": "seq2seq", "top_k": 2, "max_length": 64})
    result = score.run(config)
    workspace = Workspace(config.workspace)
    scores = workspace.read_table(SCORES)
    assert result.rows == scores.num_rows == 2 * workspace.read_table("inputs/train_queries.parquet").num_rows
    queries = dict(zip(*(workspace.read_table("inputs/train_queries.parquet")[c].to_pylist() for c in ("id", "text"))))
    passages = dict(zip(*(workspace.read_table("inputs/passages.parquet")[c].to_pylist() for c in ("id", "text"))))
    sample = scores.slice(0, 12)
    expected = Seq2SeqTeacher(t5, max_length=64).score([queries[q] for q in sample["qid"].to_pylist()],
                                                       [passages[p] for p in sample["pid"].to_pylist()])
    assert sample["score"].to_pylist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert max(scores["score"].to_pylist()) <= 0  # raw log-probabilities, not squashed
    made = json.loads(workspace.file_metadata(SCORES)["td_ray_provenance"])
    assert (made["teacher"], made["teacher_kind"], made["template"], made["max_length"]) == (
        t5, "seq2seq", "Query: {query} Document: {document} Relevant:", 64)
    assert (made["query_lang"], made["passage_lang"]) == ("en", "en")


def test_a_colbertx_score_file_is_imported_instead_of_scoring(pipeline_run, make_workspace, tmp_path):
    from td_ray.score.importers import export_colbertx

    config, _ = pipeline_run
    produced = Workspace(config.workspace).read_table(SCORES)
    path = tmp_path / "scores.jsonl.gz"
    made = json.loads(Workspace(config.workspace).file_metadata(SCORES)["td_ray_provenance"])
    assert made["teacher"] == config.score.teacher and made["score"] == "relevance logit"
    export_colbertx(produced, path, made)
    assert json.loads((tmp_path / "scores.jsonl.gz.provenance.json").read_text()) == made
    imported = make_workspace(score={"teacher": None, "import_scores": {"format": "colbertx", "path": str(path)}})
    result = score.run(imported)
    table = Workspace(imported.workspace).read_table(SCORES)
    assert result.rows == produced.num_rows
    got = {(q, p): s for q, p, s in zip(*(table[c].to_pylist() for c in ("qid", "pid", "score")))}
    want = {(q, p): s for q, p, s in zip(*(produced[c].to_pylist() for c in ("qid", "pid", "score")))}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    assert set(table["teacher"].to_pylist()) == {"import:colbertx:scores.jsonl.gz"}
    imported_from = json.loads(Workspace(imported.workspace).file_metadata(SCORES)["td_ray_provenance"])
    assert imported_from["format"] == "colbertx" and len(imported_from["sha256"]) == 64


def test_td_rays_own_first_stage_run_becomes_the_candidates(pipeline_run, make_workspace, ray_cluster):
    """First-stage retrieval by td-ray itself: index the English passages with an encoder, search the training
    queries (index + evaluate), and hand evaluate/run.trec to the score stage as data.candidates."""
    from td_ray import evaluate, index

    config, _ = pipeline_run
    demo = Path(config.workspace) / "demo"
    retrieval = make_workspace(
        data={"eval_docs": {"format": "tsv", "path": str(demo / "passages.tsv")},
              "eval_topics": {"format": "tsv", "path": str(demo / "train_queries.tsv")},
              "eval_qrels": {"format": "trec_qrels", "path": str(demo / "train_qrels.txt")}},
        index={"model": Workspace(config.workspace).path(STUDENT_DIR)}, evaluate={"depth": 5})
    index.run(retrieval)
    evaluate.run(retrieval)
    run = Workspace(retrieval.workspace).read_table(RUN)
    scoring = make_workspace(data={"candidates": {"format": "trec_run",
                                                  "path": str(Path(retrieval.workspace) / RUN_TREC)}},
                             score={"top_k": 3})
    score.run(scoring)
    scores = Workspace(scoring.workspace).read_table(SCORES)
    best_three = run.filter(pc.less_equal(run["rank"], 3))
    assert sorted(zip(scores["qid"].to_pylist(), scores["pid"].to_pylist())) == sorted(
        zip(best_three["qid"].to_pylist(), best_three["docid"].to_pylist()))
    assert len(set(scores["qid"].to_pylist())) == DemoSizes().n_train_queries  # every training query got its top 3


def test_token_budget_batches_score_each_pair_as_it_scores_alone(assets_root):
    teacher = CrossEncoderTeacher(str(assets_root / "tiny-models" / "cross_encoder"), max_length=64)
    queries = ["balto mirek", "fobe", "rima sote balto kanu", "lete"]
    passages = ["balto mirek dusa " * 6, "fobe kanu", "rima sote balto " * 9, "lete fobe kanu rima"]
    alone = [teacher.score([query], [passage])[0] for query, passage in zip(queries, passages)]
    encoded = teacher.pairs.encode(queries, passages)  # the CPU step's work: tokens, no model
    assert set(encoded) == {"input_ids", "token_type_ids"} and not hasattr(teacher.pairs, "model")
    for budget in (64, 100, 10_000):  # one pair a pass, a few, all at once: the order of the input is kept
        assert teacher.score_encoded(encoded, budget).tolist() == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("kind", ["cross_encoder", "seq2seq"])
def test_a_teacher_is_read_straight_onto_the_gpu_it_reserved(kind, assets_root, tmp_path, monkeypatch):
    import transformers

    from td_ray import devices
    from td_ray.assets.tiny_t5 import build_tiny_t5
    from td_ray.score.seq2seq import Seq2SeqTeacher

    loaded = {}

    class Loaded:
        generation_config = None

        def eval(self):
            return self

    def from_pretrained(model, **options):
        loaded.update(options)
        return Loaded()

    monkeypatch.setattr(devices, "resolve_device", lambda device=None: "cuda:0")
    if kind == "cross_encoder":
        monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
        CrossEncoderTeacher(str(assets_root / "tiny-models" / "cross_encoder"), max_length=64)
    else:
        monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", from_pretrained)
        Seq2SeqTeacher(str(build_tiny_t5(tmp_path)), max_length=64)
        assert str(loaded["dtype"]) == "torch.bfloat16"  # read in bf16: the host never holds fp32 weights
    assert loaded["device_map"] == "cuda:0"  # no whole copy in host RAM first


def test_only_the_teacher_step_reserves_gpus_and_the_cpu_step_cuts_the_same_blocks(make_workspace):
    from td_ray.raydata import actor_map_args
    from td_ray.score.actor import tokenizer_map_args

    options = make_workspace(score={"num_gpus_per_actor": 1, "num_actors": 8, "tokenizers": 4,
                                    "num_cpus_per_tokenizer": 1}).score
    teacher, tokenizer = actor_map_args(options), tokenizer_map_args(options)
    assert teacher["num_gpus"] == 1 and teacher["compute"].min_size == 8
    assert "num_gpus" not in tokenizer and tokenizer["num_cpus"] == 1 and tokenizer["compute"].min_size == 4
    assert tokenizer["batch_size"] == teacher["batch_size"] == options.batch_size  # one block a teacher call


def test_pools_that_would_leave_no_cpu_to_read_the_work_list_are_refused(make_workspace, ray_cluster):
    from td_ray.ray_session import ensure_ray

    config = make_workspace(score={"num_cpus_per_actor": 1, "tokenizers": 1, "num_cpus_per_tokenizer": 0.5})
    ensure_ray(config.ray)  # the session's 2 CPUs: 1.5 reserved leave 0.5, and a read task takes 1
    with pytest.raises(ValueError, match=r"score: 1 teachers x 1.0 CPUs and 1 tokenizers x 0.5 CPUs leave 0.5 of the "
                                         r"cluster's 2 CPUs free.*lower score.num_cpus_per_actor"):
        score.run(config)
