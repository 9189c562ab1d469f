"""Text lookups by id over exported, memory-mapped files: past 2 GiB, missing ids, exports made once."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest

from td_ray import schemas
from td_ray.textjoin import (
    LOOKUP_FILE,
    MissingTextError,
    TextLookup,
    check_coverage,
    export_text,
    open_lookup,
    write_text_file,
)
from td_ray.workspace import Workspace


def test_texts_past_2_gib_are_looked_up_without_concatenating_the_column(tmp_path):
    """Three 750 MB texts: 2.25 GB of text, past the 2 GiB a single Arrow string array can hold."""
    size = 750_000_000

    def batches():
        for name in ("a", "b", "c"):
            text = name.upper() + "x" * (size - 2) + name
            yield pa.record_batch([pa.array([name]), pa.array([text], pa.large_string())], names=["id", "text"])

    path = write_text_file(batches(), tmp_path / "big.arrow")
    assert os.path.getsize(path) > 2**31
    lookup = TextLookup(path, "big texts")
    (text,) = lookup(["c"])  # the last text starts 1.5 GB into the file
    assert len(text) == size and text[0] == "C" and text[-1] == "c"
    assert lookup.positions(["b", "zz", "a"]).tolist() == [1, -1, 0]


def test_lookups_return_texts_in_the_order_asked_and_name_missing_ids(tmp_path):
    workspace = Workspace(str(tmp_path / "ws"))
    ids = [f"p{i}" for i in range(10_000)]  # several record batches
    workspace.write_table(pa.table({"id": ids, "text": [f"text of {i}" for i in ids]}), "inputs/passages.parquet",
                          schemas.DOCS)
    lookup = open_lookup(workspace, export_text(workspace, "inputs/passages.parquet"), "passages")
    assert len(lookup) == 10_000
    assert lookup(["p9999", "p0", "p4100", "p0"]) == ["text of p9999", "text of p0", "text of p4100", "text of p0"]
    assert lookup.get(["p1", "nope"]) == ["text of p1", None]
    with pytest.raises(MissingTextError, match=r"no text in the passages for id\(s\) \['nope'\]"):
        lookup(["p1", "nope"])
    workspace.write_table(pa.table({"qid": ["q1", "q2"], "pids": [["p1", "p2"], ["p3", "absent"]]}), "examples.parquet")
    with pytest.raises(MissingTextError, match=r"1 pids value\(s\) .* e.g. \['absent'\]; translate them"):
        check_coverage(workspace, "examples.parquet", "pids", lookup, "translate them")


def test_an_export_is_made_once_and_again_when_its_table_changes(tmp_path):
    workspace = Workspace(str(tmp_path / "ws"))
    workspace.write_table(pa.table({"id": ["a"], "text": ["one"]}), "inputs/q.parquet", schemas.QUERIES)
    first = workspace.local_copy(export_text(workspace, "inputs/q.parquet")) / LOOKUP_FILE
    made = first.stat().st_mtime_ns
    assert export_text(workspace, "inputs/q.parquet") == "text/inputs--q" and first.stat().st_mtime_ns == made
    workspace.write_table(pa.table({"id": ["a"], "text": ["two"]}), "inputs/q.parquet", schemas.QUERIES)
    assert open_lookup(workspace, export_text(workspace, "inputs/q.parquet"), "q")(["a"]) == ["two"]
