"""Inputs: local files and ir_datasets read into string-keyed tables, with clear errors that keep what was done."""
from __future__ import annotations

import contextlib
import gzip
import io
import json

import ir_datasets
import pyarrow.parquet as pq
import pytest
from conftest import REALDATA, with_updates

from td_ray.config import (
    IrDatasetsSource,
    JsonlSource,
    ParquetSource,
    TrecQrelsSource,
    TrecRunSource,
    TsvSource,
)
from td_ray.sources import SourceError, ingest, iter_rows
from td_ray.workspace import Workspace


def test_tsv_jsonl_gz_and_parquet_agree_and_ids_are_strings(tmp_path):
    (tmp_path / "d.tsv").write_text("1\tfirst text\n2\tsecond\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"doc_id": 1, "title": "first", "body": "text"}) + "\n")
        handle.write(json.dumps({"doc_id": "2", "title": "second", "body": None}) + "\n")
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, TsvSource(format="tsv", path=str(tmp_path / "d.tsv")), "docs", "from_tsv")
    pq.write_table(workspace.read_table("inputs/from_tsv.parquet"), tmp_path / "d.parquet")
    rows = {
        "tsv": list(iter_rows(TsvSource(format="tsv", path=str(tmp_path / "d.tsv")), "docs")),
        "jsonl": list(iter_rows(JsonlSource(format="jsonl", path=str(tmp_path / "d.jsonl.gz"), id_field="doc_id",
                                            text_fields=["title", "body"]), "docs")),
        "parquet": list(iter_rows(ParquetSource(format="parquet", path=str(tmp_path / "d.parquet")), "docs")),
    }
    assert rows["tsv"] == rows["jsonl"] == rows["parquet"] == [("1", "first text"), ("2", "second")]


def test_duplicate_ids_fail_naming_the_id_and_keep_the_previous_table(tmp_path):
    good, bad = tmp_path / "good.tsv", tmp_path / "bad.tsv"
    good.write_text("a\tone\nb\ttwo\n")
    bad.write_text("a\tone\nb\ttwo\nb\tagain\n")
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, TsvSource(format="tsv", path=str(good)), "docs", "passages")
    with pytest.raises(SourceError, match=r"duplicate id values, e.g. \['b'\]"):
        ingest(workspace, TsvSource(format="tsv", path=str(bad)), "docs", "passages")
    assert workspace.read_table("inputs/passages.parquet")["id"].to_pylist() == ["a", "b"]
    assert not list((tmp_path / "ws" / "inputs").glob("*.tmp-*"))


def test_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "broken.tsv"
    path.write_bytes(b"1\tfine\n2\tbad \xff\xfe byte\n")
    with pytest.raises(SourceError, match=r"broken.tsv:2: not valid UTF-8"):
        list(iter_rows(TsvSource(format="tsv", path=str(path)), "docs"))


def test_malformed_lines_and_missing_files_are_named(tmp_path):
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 2.5 tag\nq1 Q0 d2 two 2.0 tag\n")
    with pytest.raises(SourceError, match=r"run.trec:2: rank must be an integer"):
        list(iter_rows(TrecRunSource(format="trec_run", path=str(tmp_path / "run.trec")), "candidates"))
    with pytest.raises(SourceError, match="input file not found: .*nope.tsv"):
        list(iter_rows(TsvSource(format="tsv", path=str(tmp_path / "nope.tsv")), "docs"))
    with pytest.raises(SourceError, match="cannot provide qrels"):
        list(iter_rows(TsvSource(format="tsv", path="x"), "qrels"))


def test_ingest_reuses_an_unchanged_source_and_rereads_a_changed_one(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\tone\n")
    workspace = Workspace(str(tmp_path / "ws"))
    source = TsvSource(format="tsv", path=str(path))
    ingest(workspace, source, "queries", "queries")
    first = (tmp_path / "ws" / "inputs" / "queries.parquet").stat().st_mtime_ns
    ingest(workspace, source, "queries", "queries")
    assert (tmp_path / "ws" / "inputs" / "queries.parquet").stat().st_mtime_ns == first
    path.write_text("q1\tone\nq2\ttwo\n")
    ingest(workspace, source, "queries", "queries")
    assert workspace.read_table("inputs/queries.parquet")["id"].to_pylist() == ["q1", "q2"]


def test_scoreddocs_are_ranked_per_query_even_when_interleaved(tmp_path):
    from ir_datasets.formats import TrecScoredDocs
    from ir_datasets.util import LocalDownload

    run = tmp_path / "bm25.run"
    run.write_text("q1 Q0 a 1 1.0 x\nq2 Q0 a 1 3.0 x\nq1 Q0 b 2 5.0 x\nq2 Q0 c 2 4.0 x\n")
    dataset = ir_datasets.Dataset(TrecScoredDocs(LocalDownload(run)))
    ir_datasets.registry.register("td-ray-test/interleaved", dataset)
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, IrDatasetsSource(format="ir_datasets", id="td-ray-test/interleaved"), "candidates", "candidates")
    table = workspace.read_table("inputs/candidates.parquet")
    rows = list(zip(*(table[name].to_pylist() for name in ("qid", "pid", "rank", "score"))))
    assert sorted(rows) == [("q1", "a", 2, 1.0), ("q1", "b", 1, 5.0), ("q2", "a", 2, 3.0), ("q2", "c", 1, 4.0)]
    assert not (tmp_path / "ws" / "inputs" / ".candidates.groups").exists()  # the grouping buckets are gone


def test_ir_datasets_docs_queries_qrels_through_its_own_api(tmp_path):
    from ir_datasets.formats import TrecQrels, TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    (tmp_path / "docs.tsv").write_text("d1\tfirst doc\nd2\tsecond doc\n")
    (tmp_path / "queries.tsv").write_text("7\tfirst\n")
    (tmp_path / "qrels").write_text("7 0 d1 2\n")
    dataset = ir_datasets.Dataset(TsvDocs(LocalDownload(tmp_path / "docs.tsv")),
                                  TsvQueries(LocalDownload(tmp_path / "queries.tsv")),
                                  TrecQrels(LocalDownload(tmp_path / "qrels"), {0: "no", 1: "yes", 2: "very"}))
    ir_datasets.registry.register("td-ray-test/local", dataset)
    source = IrDatasetsSource(format="ir_datasets", id="td-ray-test/local")
    assert list(iter_rows(source, "docs")) == [("d1", "first doc"), ("d2", "second doc")]
    assert list(iter_rows(source, "queries")) == [("7", "first")]
    assert list(iter_rows(source, "qrels")) == [("7", "d1", 2)]
    with pytest.raises(SourceError, match="no field.*'title'"):
        list(iter_rows(IrDatasetsSource(format="ir_datasets", id="td-ray-test/local", text_fields=["title"]), "docs"))
    with pytest.raises(SourceError, match="unknown ir_datasets id 'no/such/dataset'"):
        list(iter_rows(IrDatasetsSource(format="ir_datasets", id="no/such/dataset"), "docs"))


@pytest.mark.skipif(not (REALDATA / "msmarco").is_dir(), reason="../shared/realdata is absent")
def test_real_msmarco_and_qrels_files_read_with_string_ids():
    passages = list(iter_rows(TsvSource(format="tsv", path=str(REALDATA / "msmarco" / "passages.tsv"), header=True,
                                        id_column="pid", text_column="text"), "docs"))
    assert ("0", ) == passages[0][:1] and "Manhattan Project" in passages[0][1]
    assert all(isinstance(pid, str) and text for pid, text in passages)
    qrels = REALDATA / "eval_oracle" / "trec_eval" / "qrels.rel_level"
    rows = list(iter_rows(TrecQrelsSource(format="trec_qrels", path=str(qrels)), "qrels"))
    assert {relevance for _, _, relevance in rows} >= {0, 1, 2}


def test_duplicates_keep_first_policy_keeps_the_first_row_and_counts_the_rest(tmp_path):
    path = tmp_path / "dup.tsv"
    path.write_text("a\tone\nb\ttwo\nb\tagain\na\tthrice\n")
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, TsvSource(format="tsv", path=str(path), duplicates="keep_first"), "docs", "passages")
    table = workspace.read_table("inputs/passages.parquet")
    assert list(zip(table["id"].to_pylist(), table["text"].to_pylist())) == [("a", "one"), ("b", "two")]
    assert json.loads(workspace.file_metadata("inputs/passages.parquet")["td_ray_text_counts"])["duplicates_dropped"] == 2


def test_lone_surrogates_fail_naming_the_id_or_are_replaced_by_policy(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "q1", "text": "fine"}\n{"id": "q2", "text": "bad \\ud800 text"}\n')
    workspace = Workspace(str(tmp_path / "ws"))
    with pytest.raises(SourceError, match=r"id 'q2'.*invalid_text: replace"):
        ingest(workspace, JsonlSource(format="jsonl", path=str(path)), "queries", "queries")
    assert not workspace.exists("inputs/queries.parquet")
    ingest(workspace, JsonlSource(format="jsonl", path=str(path), invalid_text="replace"), "queries", "queries")
    assert workspace.read_table("inputs/queries.parquet")["text"].to_pylist() == ["fine", "bad \ufffd text"]


def test_control_characters_become_spaces_and_mojibake_is_repaired_on_request(tmp_path):
    path = tmp_path / "mojibake.tsv"
    path.write_text("1\tcafÃ© au lait\x85 dÃ©jÃ  vu\n2\tbell\x07 and nul\x00 here\n", encoding="utf-8")
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, TsvSource(format="tsv", path=str(path)), "docs", "raw")
    raw = workspace.read_table("inputs/raw.parquet")["text"].to_pylist()
    assert raw == ["cafÃ© au lait  dÃ©jÃ  vu", "bell  and nul  here"]  # controls out, mojibake kept as given
    assert workspace.file_metadata("inputs/raw.parquet")["td_ray_repair"] == "none"
    ingest(workspace, TsvSource(format="tsv", path=str(path), repair="ftfy"), "docs", "fixed")
    fixed = workspace.read_table("inputs/fixed.parquet")["text"].to_pylist()
    assert fixed[0].startswith("café au lait") and "déjà" in fixed[0]
    metadata = workspace.file_metadata("inputs/fixed.parquet")
    assert metadata["td_ray_repair"].startswith("ftfy ") and json.loads(metadata["td_ray_text_counts"])["repaired"] >= 1


class _Lines:
    """A streamer as ir_datasets' own FixEncoding reads one: lines of bytes."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def stream(self):
        return contextlib.nullcontext(io.BytesIO("".join(line + "\n" for line in self.lines).encode()))


def _ir_datasets_fix(texts: list[str]) -> list[str]:
    from ir_datasets.datasets.msmarco_passage import FixEncoding

    return [line.decode().removesuffix("\n") for line in FixEncoding(_Lines(texts))]


def _ingest_repaired(tmp_path, texts: list[str]) -> list[str]:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": text}) + "\n" for i, text in enumerate(texts)))
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, JsonlSource(format="jsonl", path=str(path), repair="ftfy"), "docs", "fixed")
    return workspace.read_table("inputs/fixed.parquet")["text"].to_pylist()


def test_the_repair_fixes_only_mojibake_as_ir_datasets_does(tmp_path):
    """Curly quotes, ligatures, full-width letters and HTML entities stay; only UTF-8 read as Latin-1 is undone,
    to the text ir_datasets' own MS MARCO fix gives (ftfy's defaults straighten the quotes and more)."""
    clean = ["The café’s “best” crêpe – 5 €", "ﬁne Ｆｕｌｌ width &amp; naïve ½ cup",
             "日本語テキスト"]
    texts = clean + [text.encode("utf-8").decode("latin-1") for text in clean]
    assert _ingest_repaired(tmp_path, texts) == _ir_datasets_fix(texts) == clean + clean


@pytest.mark.skipif(not (REALDATA / "nasty_text").is_dir(), reason="../shared/realdata is absent")
def test_the_repair_of_real_msmarco_mojibake_equals_ir_datasets_fixed_text(tmp_path):
    rows = [json.loads(line) for line in (REALDATA / "nasty_text" / "nasty_text.jsonl").read_text().split("\n") if line]
    pairs = [(row["text_raw"], row["text_fixed_by_irds_algorithm"]) for row in rows
             if row["kind"] == "raw_mojibake_real"]
    pairs += [(row["text_double_encoded_reconstructed"], row["text_fixed"]) for row in rows
              if row["kind"] == "special_chars_real_fixed_text"]
    assert len(pairs) == 6
    raw, fixed = zip(*pairs)
    assert _ingest_repaired(tmp_path, list(raw)) == list(fixed)
    assert "‘hibernate’" in fixed[0]  # curly, as in the fixed collection


def _ranked(workspace):
    table = workspace.read_table("inputs/candidates.parquet")
    return {(q, p): r for q, p, r in zip(*(table[c].to_pylist() for c in ("qid", "pid", "rank")))}


def test_candidate_ranks_that_are_not_1_to_n_are_replaced_by_score_order(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text(
        "q0 Q0 a 0 3.0 x\nq0 Q0 b 1 9.0 x\nq0 Q0 c 2 1.0 x\n"    # 0-based ranks, scores out of order
        "q1 Q0 a 1 0.5 x\nq1 Q0 b 1 0.7 x\nq1 Q0 c 1 0.6 x\n"    # constant ranks
        "q2 Q0 a 2 5.0 x\nq2 Q0 b 1 6.0 x\n"                     # a true ranking, listed out of order: kept
    )
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(workspace, TrecRunSource(format="trec_run", path=str(run)), "candidates", "candidates")
    assert _ranked(workspace) == {("q0", "b"): 1, ("q0", "a"): 2, ("q0", "c"): 3, ("q1", "b"): 1, ("q1", "c"): 2,
                                  ("q1", "a"): 3, ("q2", "b"): 1, ("q2", "a"): 2}
    counts = json.loads(workspace.file_metadata("inputs/candidates.parquet")["td_ray_candidate_counts"])
    assert counts == {"queries": 3, "reranked_queries": 2}


def test_a_query_listing_a_passage_twice_is_refused_naming_both(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q0 Q0 a 1 3.0 x\nq0 Q0 a 2 1.0 x\n")
    with pytest.raises(SourceError, match=r"query 'q0' lists passage\(s\) \['a'\] more than once"):
        ingest(Workspace(str(tmp_path / "ws")), TrecRunSource(format="trec_run", path=str(run)), "candidates",
               "candidates")


def test_an_edit_in_place_inside_a_parquet_directory_is_noticed(tmp_path):
    import os

    import pyarrow as pa

    folder = tmp_path / "docs"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["1"], "text": ["one"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["2"], "text": ["two"]}), folder / "part-1.parquet")
    workspace = Workspace(str(tmp_path / "ws"))
    source = ParquetSource(format="parquet", path=str(folder))
    ingest(workspace, source, "docs", "passages")
    stat, directory = os.stat(folder / "part-1.parquet"), os.stat(folder)
    pq.write_table(pa.table({"id": ["2"], "text": ["TWO, edited"]}), folder / "part-1.parquet")
    os.utime(folder / "part-1.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert (os.stat(folder).st_size, os.stat(folder).st_mtime_ns) == (directory.st_size, directory.st_mtime_ns)
    ingest(workspace, source, "docs", "passages")
    assert workspace.read_table("inputs/passages.parquet")["text"].to_pylist() == ["one", "TWO, edited"]


def test_a_candidates_limit_picks_the_queries_and_the_rest_is_read_only_for_them(make_workspace):
    """`--set data.candidates.limit=N`: the first N queries of the run with all their candidates, and only the
    passages and training queries (and pre-translated passages) they name; a limit elsewhere keeps the first rows;
    a changed limit re-reads the subset."""
    from td_ray import translate
    from td_ray.stage import training_sources

    base = make_workspace()
    candidates = base.data.candidates.model_dump() | {"limit": 25}
    config = make_workspace(data={"candidates": candidates,
                                  "eval_docs": base.data.eval_docs.model_dump() | {"limit": 30}})
    workspace = Workspace(config.workspace)
    for source in translate.STAGE.sources(config):
        ingest(workspace, source.config, source.role, source.name, source.field, source.within)
    ingest(workspace, config.data.eval_docs, "docs", "eval_docs")
    run = [line.split() for line in open(config.data.candidates.path, encoding="utf-8")]
    first = list(dict.fromkeys(row[0] for row in run))[:25]
    kept = workspace.read_table("inputs/candidates.parquet")
    assert list(dict.fromkeys(kept["qid"].to_pylist())) == first
    assert sorted(kept["pid"].to_pylist()) == sorted(row[2] for row in run if row[0] in set(first))
    assert set(workspace.read_table("inputs/passages.parquet")["id"].to_pylist()) == set(kept["pid"].to_pylist())
    assert set(workspace.read_table("inputs/train_queries.parquet")["id"].to_pylist()) == set(first)
    pretranslated = workspace.read_table("inputs/pretranslated_passages.syn.parquet")["id"].to_pylist()
    assert set(pretranslated) == set(kept["pid"].to_pylist())
    docs = [line.split("\t")[0] for line in open(config.data.eval_docs.path, encoding="utf-8")]
    assert workspace.read_table("inputs/eval_docs.parquet")["id"].to_pylist() == docs[:30]
    assert [source.name for source in training_sources(base)] == ["passages", "train_queries", "candidates"]

    fewer = with_updates(config, data={"candidates": candidates | {"limit": 5}})  # the same workspace, re-read
    for source in training_sources(fewer):
        ingest(workspace, source.config, source.role, source.name, source.field, source.within)
    assert set(workspace.read_table("inputs/train_queries.parquet")["id"].to_pylist()) == set(first[:5])
    assert len(workspace.read_table("inputs/passages.parquet")) < len(set(kept["pid"].to_pylist()))


@pytest.mark.parametrize(("fmt", "role", "text", "first"), [
    ("tsv", "docs", "\ufeffd1\tfirst passage\nd2\tsecond\n", ("d1", "first passage")),
    ("jsonl", "queries", '\ufeff{"id": "q1", "text": "a query"}\n', ("q1", "a query")),
    ("trec_qrels", "qrels", "\ufeffq1 0 d1 2\n", ("q1", "d1", 2)),
    ("trec_run", "candidates", "\ufeffq1 Q0 d1 1 9.5 bm25\n", ("q1", "d1", 1, 9.5)),
])
def test_a_byte_order_mark_does_not_start_the_first_id(tmp_path, fmt, role, text, first):
    from pydantic import TypeAdapter

    from td_ray.config import DataSource

    path = tmp_path / f"input.{fmt}"
    path.write_text(text, encoding="utf-8")
    source = TypeAdapter(DataSource).validate_python({"format": fmt, "path": str(path)})
    row = next(iter(iter_rows(source, role)))
    assert row[:len(first)] == first and not str(row[0]).startswith("\ufeff")
