"""Dense retrieval at collection scale: passages and MaxP, FAISS factory strings, trained indexes built in sharded
Ray tasks and merged on disk, exactly once, reused when unchanged, and clear errors for impossible settings."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import with_updates

from td_ray import evaluate, index
from td_ray.config import ConfigError, parse_config
from td_ray.encoders.dense import StudentEncoder, write_sentence_transformers_layout
from td_ray.encoders.passages import split_passages, window_starts
from td_ray.retrieval.bm25 import TooManyDocumentsError, bm25_rankings
from td_ray.retrieval import faiss_index
from td_ray.retrieval.faiss_index import (
    IndexSettingsError,
    Searcher,
    check_training_points,
    empty_index,
    gpu_plan,
    plan_index,
)
from td_ray.retrieval.layout import TRAINED, build_path, read_index_meta
from td_ray.retrieval.maxp import maxp
from td_ray.workspace import RUN, Workspace


# ------------------------------------------------------------------------------------------------ units
def test_windows_of_180_every_90_tokens_cover_the_document_once_each():
    assert window_starts(180, 180, 90) == [0]  # no longer than a passage: one passage
    assert window_starts(181, 180, 90) == [0, 90]
    assert window_starts(500, 180, 90) == [0, 90, 180, 270, 360]  # the last one ends at the end (540 >= 500)
    with pytest.raises(ValueError, match="stride"):
        window_starts(10, 5, 6)


def test_passages_are_decoded_windows_of_the_students_tokens(assets_root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets_root / "tiny-models" / "student"))
    words = sorted(token for token in tokenizer.get_vocab() if token.isalpha() and len(token) > 3)[:50]
    long_text = " ".join(words * 8)  # 400 words
    short = "balto mirek"
    passages = split_passages(tokenizer, [long_text, short], length=180, stride=90)
    tokens = len(tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert passages[1] == [short]
    assert len(passages[0]) == len(window_starts(tokens, 180, 90))
    assert [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages[0][:-1]] == [180] * (
        len(passages[0]) - 1)
    assert passages[0][0].split()[:5] == words[:5]


def test_bm25_ranks_by_rare_matching_terms_and_leaves_out_documents_without_one(monkeypatch):
    docs = [("d1", "balto mirek balto"), ("d2", "mirek zuna"), ("d3", "zuna kelo"), ("d4", "kelo kelo kelo")]
    ranked = bm25_rankings(iter(docs), len(docs), ["balto mirek", "kelo", "qwerty"], depth=10)
    assert [docid for docid, _ in ranked[0]] == ["d1", "d2"]  # balto is rarer and twice in d1
    assert [docid for docid, _ in ranked[1]] == ["d4", "d3"] and ranked[2] == []
    assert all(score > 0 for run in ranked for _, score in run)
    monkeypatch.setattr("td_ray.retrieval.bm25.MAX_DOCUMENTS", 3)
    with pytest.raises(TooManyDocumentsError, match="4 documents exceed 3; set evaluate.bm25_reference: false"):
        bm25_rankings(iter(docs), len(docs), ["kelo"], depth=10)


def test_maxp_scores_a_document_by_its_best_passage_and_breaks_ties_by_docid():
    docids = np.array(["d2", "d1", "d2", "d3", "d1"], dtype=object)
    scores = np.array([[0.9, 0.8, 0.5, 0.8, 0.1]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3, -1]])
    assert maxp(scores, ids, lambda found: docids[found], depth=10) == [[("d2", pytest.approx(0.9)),
                                                                        ("d1", pytest.approx(0.8)),
                                                                        ("d3", pytest.approx(0.8))]]
    assert [doc for doc, _ in maxp(scores, ids, lambda found: docids[found], depth=2)[0]] == ["d2", "d1"]


def test_impossible_index_settings_fail_at_validate_naming_the_fix(make_workspace):
    config = make_workspace()
    raw = config.model_dump(mode="json")
    for factory, message in (("IVF4,PQ7", r"PQ7 needs the dimension \(64\).*PQ4, PQ8, PQ16"),
                             ("IVF,Flat", r"not a FAISS factory string.*could not parse.*HNSW32"),
                             ("IVF100000,Flat", r"train_sample \(262144\) is below the 3900000")):
        with pytest.raises(ConfigError, match=message):
            parse_config(raw | {"index": raw["index"] | {"factory": factory}})
    with pytest.raises(ConfigError, match="passage_depth .* must be at least depth"):
        parse_config(raw | {"evaluate": raw["evaluate"] | {"depth": 100, "passage_depth": 50}})
    plan = plan_index("IVF64,Flat", 64)
    with pytest.raises(IndexSettingsError, match=r"IVF64 needs 39 x 64 = 2496 .* 240 available.*at most IVF6"):
        check_training_points(plan, 240, 10_000, "the 240 passages")


@pytest.mark.parametrize(("factory", "plan"), [
    ("IVF64,Flat", "clone"), ("IVF64,SQ8", "clone"), ("IVF64,PQ16", "clone"), ("OPQ16,IVF64,PQ16", "clone"),
    ("IVF64_HNSW32,Flat", "clustering_only"), ("OPQ16,IVF64_HNSW32,PQ16", "clustering_only"),
    ("IVF64,PQ16x4", "clustering_only"), ("HNSW32", "cpu"), ("Flat", "cpu"),
])
def test_gpu_plan_clones_only_what_faiss_can_put_on_a_gpu(factory, plan):
    """FAISS's GPU cloner takes an IVF index with a flat coarse quantizer and flat, SQ or 8-bit PQ codes; it refuses
    an HNSW coarse quantizer (only the k-means goes to the GPU then). HNSW has no GPU form and Flat needs no
    training."""
    assert gpu_plan(empty_index(plan_index(factory, 64))) == plan


@pytest.fixture
def fake_gpu(monkeypatch) -> list[str]:
    """A FAISS that sees one GPU whose clones are the CPU indexes themselves; returns the types cloned to it."""
    cloned: list[str] = []

    def clone(index):
        cloned.append(type(faiss.downcast_index(index)).__name__)
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", clone)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
    return cloned


def test_an_ivf_hnsw_index_trains_its_kmeans_on_the_gpu_and_stays_on_the_cpu(fake_gpu, tmp_path):
    """IVF64_HNSW32 on a (faked) GPU: only a flat L2 k-means assigner is cloned, as FAISS's CPU k-means for an HNSW
    quantizer assigns, so the centroids are the CPU's; the index is never cloned, not to train nor to add. An IVF
    index with a flat quantizer is cloned whole for both."""
    vectors = np.random.default_rng(0).standard_normal((64 * 40, 64)).astype(np.float32)
    plan = plan_index("IVF64_HNSW32,Flat", 64)
    on_gpu = faiss_index.train(plan, vectors, "auto")
    assert fake_gpu == ["IndexFlatL2"]
    assert faiss.try_extract_index_ivf(on_gpu).clustering_index is None  # no pointer to the freed GPU assigner
    centroids = [faiss.try_extract_index_ivf(index).quantizer.reconstruct_n(0, 64)
                 for index in (on_gpu, faiss_index.train(plan, vectors, "cpu"))]
    np.testing.assert_allclose(*centroids, atol=1e-5)
    faiss_index.write_atomic(on_gpu, tmp_path / "trained.faiss")
    batches = [(vectors[:100], np.arange(100))]
    assert faiss_index.add_shard(tmp_path / "trained.faiss", batches, tmp_path / "shard.faiss", "auto").rows == 100
    assert fake_gpu == ["IndexFlatL2"] and faiss.read_index(str(tmp_path / "shard.faiss")).ntotal == 100

    flat_plan = plan_index("IVF64,Flat", 64)
    faiss_index.write_atomic(faiss_index.train(flat_plan, vectors, "auto"), tmp_path / "flat.faiss")
    faiss_index.add_shard(tmp_path / "flat.faiss", batches, tmp_path / "flat-shard.faiss", "auto")
    assert fake_gpu == ["IndexFlatL2", "IndexIVFFlat", "IndexIVFFlat"]


def test_the_searcher_reads_each_file_once_and_answers_as_exact_search(tmp_path, monkeypatch):
    """Three Flat shards: the searcher opens (memory-maps) each when it is made; searches read no file again, and
    answer as one exact index over every vector."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    paths = []
    for shard, rows in enumerate(np.array_split(np.arange(300), 3)):
        index = empty_index(plan_index("Flat", 16))
        index.add_with_ids(vectors[rows], rows)
        paths.append(tmp_path / f"shard-{shard}.faiss")
        faiss_index.write_atomic(index, paths[-1])
    searcher = Searcher(paths, None)
    assert searcher.ntotal == 300 and searcher.dim == 16
    reads = []
    monkeypatch.setattr(faiss, "read_index", lambda *args: reads.append(args))
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    for queries in (rng.standard_normal((5, 16)), rng.standard_normal((7, 16))):
        expected_scores, expected_ids = exact.search(queries.astype(np.float32), 10)
        scores, ids = searcher.search(queries, 10)
        assert np.array_equal(ids, expected_ids) and np.allclose(scores, expected_scores, atol=1e-5)
    assert reads == []


# ------------------------------------------------------------------------------------------------ stages
def _overlap_at_10(first: Path, second: Path) -> float:
    def top(path: Path) -> dict[str, set[str]]:
        run = pq.read_table(path).to_pylist()
        return {qid: {row["docid"] for row in run if row["qid"] == qid and row["rank"] <= 10}
                for qid in {row["qid"] for row in run}}

    a, b = top(first), top(second)
    return float(np.mean([len(a[qid] & b[qid]) / len(a[qid]) for qid in a]))


@pytest.fixture(scope="module")
def bag_of_words_student(assets_root, tmp_path_factory) -> Path:
    """A student whose vector is the mean of its tokens' random embeddings (no transformer layer), compared by
    cosine: a passage full of the query's words is close to the query whatever the rest of its document says.
    Unlike the six-step demo student, whose scores are nearly tied, it ranks by content, so quantisation error
    shows as the ranking changes it causes rather than as noise among ties."""
    from td_ray.assets.tiny_models import build_lexical_student

    out = build_lexical_student(assets_root / "tiny-models" / "student", tmp_path_factory.mktemp("bow-student"))
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    write_sentence_transformers_layout(out, hidden, "mean", "cosine", max_length=512)
    return out


def test_a_sharded_ivf_pq_build_survives_a_killed_task_equals_one_process_and_keeps_flats_top_10(
        make_workspace, bag_of_words_student, ray_cluster, monkeypatch, tmp_path):
    """Over the demo collection: an exact (Flat) index in three shards searched together; then IVF-PQ, a changed
    setting, built beside it in three shard tasks (one SIGKILLed once and retried) and swapped in. The merged
    on-disk index answers as one process adding every vector to the same trained index, its top 10 keep at least
    90 % of Flat's, and a re-run reuses it."""
    config = make_workspace(index={"model": str(bag_of_words_student), "factory": "Flat", "num_shards": 3,
                                   "keep_vectors": True})
    workspace = Workspace(config.workspace)
    flat = index.run(config)
    flat_meta = read_index_meta(workspace)
    assert flat_meta["factory"] == "Flat" and len(flat_meta["files"]) == 3  # Flat shards cannot merge on disk
    evaluate.run(config)
    flat_run = tmp_path / "flat-run.parquet"
    os.replace(workspace.path(RUN), flat_run)

    # IVF4 with every list probed: what is lost is PQ's quantisation; 64 one-dimension codebooks of 6 bits each
    # keep 64 centroids trainable on the demo's 240 passages.
    config = with_updates(config, index={"factory": "IVF4,PQ64x6", "train_sample": 1000},
                          evaluate={"search_params": "nprobe=4"})
    marker = tmp_path / "killed-once"
    original = index.shard_task

    def killed_once(*args):  # shard_task(workspace, build, table, shard, out, device)
        if args[3] == 1 and not marker.exists():  # shard 1, first attempt: the worker dies mid-task
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args)

    monkeypatch.setattr(index, "shard_task", killed_once)
    built = index.run(config)
    assert "unchanged" not in built.metrics and marker.exists()
    assert built.metrics["passages"] == flat.metrics["passages"] == sum(built.metrics[f"shard_{i}_size"]
                                                                        for i in range(3))
    meta = read_index_meta(workspace)
    assert meta["build"] != flat_meta["build"] and not build_path(workspace, flat_meta).exists()
    assert meta["files"] == ["index.faiss"] and build_path(workspace, meta, "index.ivfdata").is_file()
    assert not list(build_path(workspace, meta).glob("shard-*"))  # merged into the on-disk lists

    table = pq.read_table(build_path(workspace, meta, "embeddings.parquet"), columns=["faiss_id", "vector"])
    assert len(set(table["faiss_id"].to_pylist())) == table.num_rows == built.metrics["passages"]
    vectors = np.asarray(table["vector"].combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    one_process = faiss.read_index(str(build_path(workspace, meta, TRAINED)))
    one_process.add_with_ids(vectors, table["faiss_id"].to_numpy())
    faiss.ParameterSpace().set_index_parameters(one_process, "nprobe=4")
    queries = vectors[::17][:12] + 0.05
    expected_scores, expected_ids = one_process.search(queries, 10)
    scores, ids = Searcher([build_path(workspace, meta, "index.faiss")], "nprobe=4").search(queries, 10)
    assert np.array_equal(ids, expected_ids) and np.allclose(scores, expected_scores, atol=1e-5)

    evaluate.run(config)
    assert _overlap_at_10(Path(workspace.path(RUN)), flat_run) >= 0.9
    assert index.run(config).metrics["unchanged"] == 1.0  # the same documents, student and settings


def test_maxp_finds_relevant_text_past_the_first_180_tokens_where_truncation_cannot(make_workspace,
                                                                                   bag_of_words_student, ray_cluster,
                                                                                   tmp_path):
    from transformers import AutoTokenizer

    student = bag_of_words_student
    words = sorted(token for token in AutoTokenizer.from_pretrained(str(student)).get_vocab()  # a hash map's order
                   if token.isalpha() and len(token) > 3)[:260]
    query, filler = words[:3], words[3:]
    rng = np.random.default_rng(5)
    docs = {f"doc{number:02d}": list(rng.choice(filler, size=600)) for number in range(20)}
    without_query = " ".join(docs["doc07"])
    docs["doc07"][400:400] = query * 20  # the relevant document: its query words sit at tokens 400-460, past 180
    docs = {doc: " ".join(words) for doc, words in docs.items()}
    (tmp_path / "docs.tsv").write_text("".join(f"{doc}\t{text}\n" for doc, text in docs.items()))
    (tmp_path / "topics.tsv").write_text(f"t1\t{' '.join(query)}\n")
    (tmp_path / "qrels.txt").write_text("t1 0 doc07 1\n")
    data = {"eval_docs": {"format": "tsv", "path": str(tmp_path / "docs.tsv")},
            "eval_topics": {"format": "tsv", "path": str(tmp_path / "topics.tsv")},
            "eval_qrels": {"format": "trec_qrels", "path": str(tmp_path / "qrels.txt")}}
    config = make_workspace(data=data, index={"model": str(student), "passages": {"length": 180, "stride": 90},
                                              "max_length": 200, "num_shards": 1},
                            evaluate={"depth": 10, "passage_depth": 10})
    index.run(config)
    evaluate.run(config)
    run = pq.read_table(Workspace(config.workspace).path(RUN)).to_pylist()
    assert len({row["docid"] for row in run}) == len(run) == 10  # documents, never passages, filled to depth
    assert next(row["rank"] for row in run if row["docid"] == "doc07") == 1
    # truncated at 200 tokens, as the index stage does without passages, doc07 is the same vector as with no
    # relevant text at all: the same student cannot find it
    encoder = StudentEncoder(str(student), max_length=200)
    truncated, unrelated = encoder.encode([docs["doc07"], without_query])
    assert np.allclose(truncated, unrelated)
