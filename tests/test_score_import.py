"""Teacher score files: ColBERT-X, msmarco-hard-negatives and PyLate read into SCORES, and exported back."""
from __future__ import annotations

import gzip
import json
import math
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REALDATA

from td_ray import schemas
from td_ray.score import importers
from td_ray.score.importers import (
    ScoreFileError,
    export_colbertx,
    import_score_file,
    read_score_file,
)
from td_ray.workspace import Workspace

TEACHER = "import:test"


def write_lines(path, records, raw: bool = False):
    """Write JSON records (or raw strings) one per line, gzipped when the name ends in .gz."""
    text = "".join((record if raw else json.dumps(record)) + "\n" for record in records)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def triples(table: pa.Table) -> dict[tuple[str, str], float]:
    return {(q, p): s for q, p, s in zip(*(table[name].to_pylist() for name in ("qid", "pid", "score")))}


MIXED_IDS = [
    [19335, [8412684, 10.594], [3175481, 9.5839], ["d-7", -2.5]],
    ["q-b", ["x_1", 0.25], [17, 3.0]],
    ["42", [5, 1e-3]],
]


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.jsonl.gz"])
def test_colbertx_round_trip_with_int_and_string_ids(tmp_path, name):
    source = write_lines(tmp_path / f"in-{name}", MIXED_IDS)
    first = read_score_file(source, "colbertx", teacher=TEACHER)
    assert first.table.schema == schemas.SCORES
    assert (first.rows, first.queries, first.skipped) == (6, 3, [])
    assert set(first.table["teacher"].to_pylist()) == {TEACHER}
    assert triples(first.table)[("19335", "d-7")] == -2.5 and ("q-b", "17") in triples(first.table)

    exported = tmp_path / name
    assert export_colbertx(first.table, exported) == 3
    opener = gzip.open if name.endswith(".gz") else open
    with opener(exported, "rt", encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    assert [line[0] for line in lines] == ["19335", "q-b", "42"]  # first-appearance order, ids as strings
    assert lines[1] == ["q-b", ["17", 3.0], ["x_1", 0.25]]  # best first
    assert all(isinstance(pid, str) and isinstance(score, float) for line in lines for pid, score in line[1:])

    again = read_score_file(exported, "colbertx", teacher=TEACHER)
    before, after = triples(first.table), triples(again.table)
    assert before.keys() == after.keys()
    assert all(math.isclose(before[key], after[key], rel_tol=1e-7) for key in before)
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("lines, pattern", [
    (['["q1", ["p1", 1.0]]', '["q2", ["p1", 1.0]'], r"s\.jsonl:2: not JSON"),
    (['{"qid": "q1"}'], r"s\.jsonl:1: expected a JSON array"),
    (['["q1", ["p1", 1.0]]', '["q2", ["p1", 1.0, 3]]'], r":2: query 'q2': each candidate must be a \[pid, score\]"),
    (['["q1", "p1", "p2"]'], r":1: query 'q1': .*has no scores"),
    (['["q1", ["p1", 1.0]]', '["q2", ["p1", "high"]]'], r":2: query 'q2': passage 'p1' has a non-numeric score"),
    (['["q1", ["p1", 1.0]]', '["q2", ["p1", NaN]]'], r":2: query 'q2': passage 'p1' has score nan"),
    (['["q1", ["p1", Infinity]]'], r":1: query 'q1': passage 'p1' has score inf"),
    (['["q1", ["p1", 1e39]]'], r":1: query 'q1': .*finite float32"),
    (['["q1", ["p1", true]]'], r":1: query 'q1': passage 'p1' has a non-numeric score True"),
    (['["q1", [1.5, 2.0]]'], r":1: query 'q1': a passage id must be a non-empty string or an integer"),
    (['["q1", ["p1", 1.0]]', '', '["q2"]'], r":3: query 'q2': no candidates"),
    (['["q1", ["p1", 1.0]]', '["q2", ["p1", 1.0]]', '["q3", ["p", 1]]', '["q1", ["p2", 2.0]]'],
     r":4: query 'q1': the query already appeared on line 1"),
    (['["q1", ["p1", 1.0], ["p1", 2.0]]'], r":1: query 'q1': passage 'p1' has two different scores \(1\.0 and 2\.0\)"),
])
def test_malformed_colbertx_lines_are_rejected_naming_line_and_query(tmp_path, lines, pattern):
    path = write_lines(tmp_path / "s.jsonl", lines, raw=True)
    with pytest.raises(ScoreFileError, match=pattern):
        read_score_file(path, "colbertx", teacher=TEACHER)


def test_same_pid_twice_with_equal_scores_is_kept_once(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [["q1", ["p1", 1.5], ["p2", 0.5], ["p1", 1.5]]])
    imported = read_score_file(path, "colbertx", teacher=TEACHER)
    assert imported.table["pid"].to_pylist() == ["p1", "p2"] and imported.rows == 2


def test_short_lists_are_skipped_and_counted_or_stop_the_import(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [
        ["q1", ["a", 3.0], ["b", 2.0], ["c", 1.0]],
        ["q2", ["a", 3.0], ["b", 2.0]],
        ["q3", ["a", 3.0], ["b", 2.0], ["a", 3.0]],  # 3 entries, but 2 unique passages
        ["q4", ["a", 1.0], ["b", 2.0], ["c", 3.0], ["d", 4.0]],
    ])
    kept = read_score_file(path, "colbertx", teacher=TEACHER, nway=3, short_list="skip")
    assert (kept.queries, kept.rows, kept.skipped) == (2, 7, ["q2", "q3"])
    assert set(kept.table["qid"].to_pylist()) == {"q1", "q4"}
    with pytest.raises(ScoreFileError, match=r"s\.jsonl:2: query 'q2': 2 candidates, fewer than nway=3"):
        read_score_file(path, "colbertx", teacher=TEACHER, nway=3, short_list="error")
    with pytest.raises(ScoreFileError, match=r"no queries to import \(4 skipped as shorter than nway=5\)"):
        read_score_file(path, "colbertx", teacher=TEACHER, nway=5, short_list="skip")


def test_st_hard_negatives_merge_positives_and_every_system(tmp_path):
    path = write_lines(tmp_path / "hn.jsonl.gz", [
        {"qid": 571018, "pos": [{"pid": 7349777, "ce-score": 9.5}],
         "neg": {"bm25": [{"pid": 1, "ce-score": -3.0}, {"pid": 2, "ce-score": 0.5}],
                 "msmarco-distilbert-base-tas-b": [{"pid": 2, "ce-score": 0.5}, {"pid": "3", "ce-score": -1}]}},
        {"qid": "q2", "pos": [{"pid": 4, "ce-score": 2.0}], "neg": {}},
    ])
    imported = read_score_file(path, "st_hard_negatives", teacher=TEACHER)
    assert list(zip(imported.table["qid"].to_pylist(), imported.table["pid"].to_pylist(),
                    imported.table["score"].to_pylist())) == [
        ("571018", "7349777", 9.5), ("571018", "1", -3.0), ("571018", "2", 0.5), ("571018", "3", -1.0),
        ("q2", "4", 2.0),
    ]
    assert imported.queries == 2


@pytest.mark.parametrize("record, pattern", [
    ({"qid": 7, "pos": [{"pid": 1, "ce-score": 1.0}], "neg": {"bm25": [{"pid": 1, "ce-score": 0.0}]}},
     r"hn\.jsonl:2: query '7': passage '1' has two different scores"),
    ({"qid": 7, "pos": [1], "neg": {"bm25": [2, 3]}}, r":2: query '7': pos holds 1, .*no teacher scores"),
    ({"qid": 7, "pos": [], "neg": {}}, r":2: query '7': no candidates"),
    ({"qid": 7, "pos": [{"pid": 1, "ce-score": 1.0}], "neg": ["bm25"]}, r":2: query '7': 'pos' must be a list"),
    ({"query_id": 7, "document_ids": [1], "scores": [1.0]}, r":2: expected a JSON object with qid, pos and neg"),
])
def test_malformed_st_hard_negatives_are_rejected(tmp_path, record, pattern):
    good = {"qid": 1, "pos": [{"pid": 1, "ce-score": 1.0}]}
    path = write_lines(tmp_path / "hn.jsonl", [good, record])
    with pytest.raises(ScoreFileError, match=pattern):
        read_score_file(path, "st_hard_negatives", teacher=TEACHER)


def test_pylate_jsonl_and_parquet_agree_and_lengths_must_match(tmp_path):
    rows = [{"query_id": 54528, "document_ids": [6862419, 335116], "scores": [0.45, 0.66]},
            {"query_id": "q2", "document_ids": ["a"], "scores": [1]}]
    from_jsonl = read_score_file(write_lines(tmp_path / "kd.jsonl", rows), "pylate", teacher=TEACHER)
    pq.write_table(pa.Table.from_pylist([{**row, "query_id": str(row["query_id"]),
                                          "document_ids": [str(pid) for pid in row["document_ids"]],
                                          "scores": [float(s) for s in row["scores"]]} for row in rows]),
                   tmp_path / "kd.parquet")
    from_parquet = read_score_file(tmp_path / "kd.parquet", "pylate", teacher=TEACHER)
    assert triples(from_jsonl.table) == triples(from_parquet.table)
    assert set(triples(from_jsonl.table)) == {("54528", "6862419"), ("54528", "335116"), ("q2", "a")}

    mismatch = {"query_id": 9, "document_ids": [1, 2, 3], "scores": [0.1, 0.2]}
    with pytest.raises(ScoreFileError, match=r"kd\.jsonl:3: query '9': 3 document_ids but 2 scores"):
        read_score_file(write_lines(tmp_path / "kd.jsonl", [*rows, mismatch]), "pylate", teacher=TEACHER)
    pq.write_table(pa.table({"query_id": ["q1", "q2"], "document_ids": [["a"], ["b", "c"]],
                             "scores": [[1.0], [float("nan"), 1.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(ScoreFileError, match=r"bad\.parquet row 2: query 'q2': passage 'b' has score nan"):
        read_score_file(tmp_path / "bad.parquet", "pylate", teacher=TEACHER)


def test_a_pickle_is_never_loaded_and_reads_as_not_json_at_line_1(tmp_path, monkeypatch):
    path = tmp_path / "ce_scores.jsonl"
    path.write_bytes(pickle.dumps({"q1": {"p1": 1.0}}, protocol=4))

    def forbidden(*args, **kwargs):
        raise AssertionError("the importer must never unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    with pytest.raises(ScoreFileError, match=r"ce_scores\.jsonl:1: not JSON .*Python pickle"):
        read_score_file(path, "colbertx", teacher=TEACHER)


def test_a_truncated_gzip_and_a_missing_file_give_clear_errors(tmp_path):
    path = write_lines(tmp_path / "s.jsonl.gz", MIXED_IDS * 1)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ScoreFileError, match=r"not a complete gzip file"):
        read_score_file(path, "colbertx", teacher=TEACHER)
    with pytest.raises(ScoreFileError, match=r"score file not found"):
        read_score_file(tmp_path / "absent.jsonl", "colbertx", teacher=TEACHER)
    with pytest.raises(ScoreFileError, match=r"unknown score file format 'tsv'"):
        read_score_file(path, "tsv", teacher=TEACHER)


def test_workspace_import_streams_in_batches_and_leaves_nothing_on_error(tmp_path, monkeypatch):
    monkeypatch.setattr(importers, "_BATCH_ROWS", 2)
    workspace = Workspace(str(tmp_path / "ws"))
    good = write_lines(tmp_path / "good.jsonl", MIXED_IDS)
    summary = import_score_file(workspace, "score/scores.parquet", good, "colbertx", teacher=TEACHER, nway=2,
                                short_list="skip")
    assert (summary.rows, summary.queries, summary.skipped) == (5, 2, ["42"])
    written = workspace.read_table("score/scores.parquet")
    assert written.schema == schemas.SCORES
    assert triples(written) == triples(read_score_file(good, "colbertx", teacher=TEACHER, nway=2,
                                                       short_list="skip").table)

    bad = write_lines(tmp_path / "bad.jsonl", [*MIXED_IDS, ["q9", ["p", "x"]]])
    with pytest.raises(ScoreFileError, match=r"bad\.jsonl:4: query 'q9'"):
        import_score_file(workspace, "score/scores.parquet", bad, "colbertx", teacher=TEACHER)
    assert triples(workspace.read_table("score/scores.parquet")) == triples(written)  # previous table kept
    assert [p.name for p in (tmp_path / "ws" / "score").iterdir()] == ["scores.parquet"]


def test_export_takes_batches_and_rejects_repeated_pairs_nulls_and_nan(tmp_path):
    def batch(qids, pids, scores):
        return pa.table({"qid": qids, "pid": pids, "score": pa.array(scores, pa.float32())})

    path = tmp_path / "out.jsonl"
    assert export_colbertx([batch(["b", "a"], ["1", "2"], [1.0, 2.0]), batch(["b"], ["3"], [5.0])], path) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [["b", ["3", 5.0], ["1", 1.0]],
                                                                           ["a", ["2", 2.0]]]
    with pytest.raises(ScoreFileError, match=r"query 'b' passage '1' twice"):
        export_colbertx(batch(["b", "a", "b"], ["1", "2", "1"], [1.0, 2.0, 1.0]), tmp_path / "dup.jsonl")
    assert not (tmp_path / "dup.jsonl").exists() and not list(tmp_path.glob("*.tmp-*"))
    for bad in (batch(["a"], ["1"], [float("nan")]), batch(["a", None], ["1", "2"], [1.0, 2.0])):
        with pytest.raises(ScoreFileError, match=r"null ids or scores, or non-finite scores"):
            export_colbertx(bad, tmp_path / "bad.jsonl")
    assert export_colbertx(batch(["a"], ["1"], [1.0]), tmp_path / "new" / "dir" / "s.jsonl") == 1


SAMPLES = REALDATA / "teacher_scores"


@pytest.mark.skipif(not (SAMPLES / "bm25_dl19_top6_plaidx_format.jsonl").is_file(),
                    reason="no real score-file sample in ../shared/realdata")
def test_real_score_samples_import_cleanly(tmp_path):
    imported = read_score_file(SAMPLES / "bm25_dl19_top6_plaidx_format.jsonl", "colbertx", teacher=TEACHER, nway=6)
    table = imported.table
    assert imported.queries == 43 and imported.rows == 43 * 6 == table.num_rows
    assert all(isinstance(value, str) and value for value in table["qid"].to_pylist() + table["pid"].to_pylist())
    assert all(math.isfinite(score) for score in table["score"].to_pylist())
    assert len(triples(table)) == table.num_rows  # each query's candidates are unique
    export_colbertx(table, tmp_path / "again.jsonl.gz")
    assert triples(read_score_file(tmp_path / "again.jsonl.gz", "colbertx", teacher=TEACHER).table) == triples(table)

    # PyLate's documented row and the same row in the ColBERT-X format give the same scores
    kd_row = json.loads((SAMPLES / "pylate_docs_example_kd_row.json").read_text())
    pylate = read_score_file(write_lines(tmp_path / "kd.jsonl", [kd_row]), "pylate", teacher=TEACHER)
    colbertx = read_score_file(SAMPLES / "pylate_docs_example_as_plaidx_format.jsonl", "colbertx", teacher=TEACHER)
    assert triples(pylate.table) == triples(colbertx.table) and pylate.rows == len(kd_row["document_ids"])
