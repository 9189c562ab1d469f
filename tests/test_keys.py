"""Keys as hashes: digests, differences named by id, the exactly-once writer, hash sets, temporaries."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from td_ray.errors import ExactlyOnceError
from td_ray.keys import Digest, HashSet, describe_differences, key_hashes, repeated_hashes
from td_ray.workspace import Workspace

SCHEMA = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("score", pa.float32())])


def _pairs(rows):
    return pa.table({"qid": [r[0] for r in rows], "pid": [r[1] for r in rows]})


def test_a_digest_ignores_order_and_notices_a_swapped_repeat():
    rows = [("q1", "a"), ("q1", "b"), ("q2", "a")]
    assert Digest.of([_pairs(rows)]) == Digest.of([_pairs(rows[::-1][:1]), _pairs(rows[::-1][1:])])
    # same row count, one key repeated in place of another
    assert Digest.of([_pairs(rows)]) != Digest.of([_pairs([rows[0], rows[0], rows[2]])])
    # the columns are a key together: (q1, a) differs from (a, q1)
    assert key_hashes(_pairs([("q1", "a")]))[0] != key_hashes(_pairs([("a", "q1")]))[0]


def test_differences_name_missing_repeated_and_unexpected_keys():
    expected = [("q1", "a"), ("q1", "b"), ("q2", "c")]
    written = [("q1", "a"), ("q1", "a"), ("q9", "z")]
    found = describe_differences(lambda: [_pairs(expected)], lambda: [_pairs(written)], rows=3)
    assert found == {"missing": [("q1", "b"), ("q2", "c")], "repeated": [("q1", "a")], "unexpected": [("q9", "z")]}


def test_the_exactly_once_writer_commits_only_the_expected_keys(tmp_path):
    workspace = Workspace(str(tmp_path))
    expected = lambda: [_pairs([("q1", "a"), ("q1", "b")])]  # noqa: E731
    batch = pa.table({"qid": ["q1", "q1"], "pid": ["b", "a"], "score": pa.array([1.0, 2.0], pa.float32())})
    with workspace.exactly_once_writer("out.parquet", SCHEMA, ["qid", "pid"], expected) as writer:
        writer.write(batch.slice(0, 1))
        writer.write(batch.slice(1))
    assert workspace.row_count("out.parquet") == 2
    with pytest.raises(ExactlyOnceError, match=r"missing \[\('q1', 'b'\)\], repeated \[\('q1', 'a'\)\]"):
        with workspace.exactly_once_writer("out.parquet", SCHEMA, ["qid", "pid"], expected) as writer:
            writer.write(batch.slice(1))
            writer.write(batch.slice(1))
    assert workspace.read_table("out.parquet")["pid"].to_pylist() == ["b", "a"]  # the committed table is intact
    assert not list(tmp_path.glob("out.parquet.tmp-*"))


def test_without_expected_keys_the_writer_refuses_repeats_only():
    rows = pa.table({"qid": ["q1", "q2", "q1"], "pid": ["a", "a", "a"], "score": pa.array([1, 2, 3], pa.float32())})
    assert len(repeated_hashes(iter([key_hashes(rows, ["qid", "pid"])]))) == 1
    assert len(repeated_hashes(iter([key_hashes(rows.slice(0, 2), ["qid", "pid"])]))) == 0


def test_a_hash_set_answers_membership_for_a_whole_batch():
    members = HashSet.of([pa.table({"id": ["a", "b", "c"]})])
    asked = key_hashes(pa.table({"id": ["c", "x", "a", "zz"]}))
    assert members.contains(asked).tolist() == [True, False, True, False]
    assert HashSet(np.zeros(0, np.uint64)).contains(asked).tolist() == [False] * 4


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    workspace = Workspace(str(tmp_path))
    keep = [tmp_path / "score" / "scores.parquet", tmp_path / "score" / "notes.tmp-later.txt"]
    stale = [tmp_path / "score" / "scores.parquet.tmp-0a1b2c3d",
             tmp_path / "score" / "blocks" / "k" / ".part-1.parquet.12345678.tmp"]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert workspace.remove_temporaries("score", "absent") == 2
    assert all(path.exists() for path in keep) and not any(path.exists() for path in stale)
