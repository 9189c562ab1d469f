"""ColBERT-X at collection scale: the compressed (PLAID-style) token index against exact MaxSim, its sharded build,
and the index and evaluate stages with a registered ColBERT student."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import with_updates
from td_ray.encoders.colbert import ColBERTStudentEncoder, maxsim
from td_ray.errors import StaleIndexError
from td_ray.index.core import plan_centroids
from td_ray.retrieval import plaid
from td_ray.retrieval.faiss_index import IndexSettingsError
from td_ray.retrieval.layout import add_deleted
from td_ray.retrieval.maxp import maxp
from td_ray.retrieval.maxsim import exhaustive_search, maxsim_scores
from td_ray.workspace import EVAL_DOCS, EVAL_TOPICS, RUN, Workspace


def unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clustered():
    """300 passages of 3 to 40 tokens at dim 32, drawn around 48 topic directions (token vectors cluster, as a
    student's do), and 6 queries of 8 tokens taken near tokens of the collection."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(48, 32))
    counts = rng.integers(3, 41, size=300)
    tokens = unit(centers[rng.integers(0, 48, counts.sum())] + 0.35 * rng.normal(size=(counts.sum(), 32)))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    queries = unit(tokens[rng.integers(0, len(tokens), (6, 8))] + 0.1 * rng.normal(size=(6, 8, 32)))
    return tokens, offsets, queries


def build(directory: Path, codec: plaid.ResidualCodec, tokens, offsets, shards: int, row_group: int = 37) -> dict:
    """The build's steps in this process (the stage runs the same functions in Ray tasks): the codes table,
    the allocated arrays, one fill per shard, the merged lists. Returns the index's metadata."""
    directory.mkdir(parents=True, exist_ok=True)
    codec.save(directory)
    ids, residuals = codec.encode(tokens)
    passages, counts = len(offsets) - 1, np.diff(offsets)
    table = pa.table({"faiss_id": np.arange(passages), "first_token": offsets[:-1], "tokens": counts.astype(np.int32),
                      "centroid_ids": plaid.per_passage_bytes(ids, counts),
                      "residuals": plaid.per_passage_bytes(residuals, counts)})
    pq.write_table(table, directory / "codes.parquet", row_group_size=row_group)
    layout = plaid.Layout(passages, len(tokens), codec.code_bytes, codec.id_dtype.str, codec.nlist)
    layout.allocate(directory)
    for shard, (first, last) in enumerate(plaid.shard_ranges(passages, shards)):
        plaid.write_shard(directory / "codes.parquet", directory, shard, first, last, layout)
    plaid.merge_lists(directory, list(range(shards)), layout)
    return {"passages": passages, "tokens": len(tokens), "dim": codec.dim, "centroids": codec.nlist,
            "query_maxlen": 8}


def test_centroids_follow_plaids_rule_within_what_the_sample_trains():
    assert plaid.default_centroids(1_000_000) == 2**13  # 16 x 1000 = 16,000 -> 8,192
    assert plaid.default_centroids(2_700_000_000) == 2**19  # NeuCLIR Chinese at 180/90 passages
    assert plan_centroids(None, 1_000_000, 5_000) == 4096  # lowered to a power of two the sample can train
    assert plan_centroids(300, 10, 5_000) == 300
    with pytest.raises(IndexSettingsError, match="index.colbert.centroids 6000: .*raise index.train_sample"):
        plan_centroids(6000, 10**6, 5_000)


def test_decoded_tokens_are_within_the_codecs_error_bound(clustered):
    tokens, _, _ = clustered
    bounds = []
    for nbits in plaid.NBITS:
        codec = plaid.ResidualCodec.train(tokens, 64, nbits)
        ids, residuals = codec.encode(tokens)
        assert residuals.shape == (len(tokens), 32 * nbits // 8) and ids.dtype == np.uint16 and ids.max() < 64
        assert codec.bytes_per_token == 2 + 32 * nbits // 8
        assert np.abs(codec.decode(ids, residuals).numpy() - tokens).max() <= codec.error_bound() + 1e-6
        bounds.append(codec.error_bound())
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] < 0.01, bounds  # more bits, a tighter bound


@pytest.mark.parametrize("nbits", plaid.NBITS)
def test_torch_compression_writes_the_codes_faiss_writes_for_the_same_codec(clustered, nbits):
    """The actors and the codec task compress in torch (on their GPU, or every CPU thread they reserved); the
    codec file stays FAISS's, so its `sa_encode` must give the same list numbers and residual codes, and its
    `sa_decode` the same vectors."""
    tokens, _, _ = clustered
    torch.set_num_threads(2)
    codec = plaid.ResidualCodec.train(tokens, 64, nbits)
    ids, residuals = codec.encode(tokens)
    faiss_codes = codec.index.sa_encode(tokens)
    assert codec.id_bytes == 1 and np.array_equal(faiss_codes[:, 0], ids)
    assert np.array_equal(faiss_codes[:, 1:], residuals)
    np.testing.assert_allclose(codec.decode(ids, residuals).numpy(), codec.index.sa_decode(faiss_codes), atol=1e-6)
    reloaded = plaid.ResidualCodec.from_parts(codec.centroids().copy(), nbits, None if nbits == 8 else codec._table,
                                              codec.low, codec.high)
    assert np.array_equal(reloaded.encode(tokens)[1], residuals)


def test_the_residual_levels_are_fitted_on_the_whole_sample(clustered):
    """FAISS fitted each dimension's levels on 256 residuals a level; td-ray fits them on every residual: the
    levels are then the 1-D k-means optimum of the whole sample, where each level is the mean of the residuals
    nearest to it."""
    tokens, _, _ = clustered
    codec = plaid.ResidualCodec.train(tokens, 16, 2)
    ids, _ = codec.encode(tokens)
    residuals = tokens - codec.centroids()[ids.astype(np.int64)]
    levels = codec.levels()
    nearest = np.abs(residuals[:, :, None] - levels[None]).argmin(axis=2)
    for dim in (0, 13, 31):
        means = [residuals[nearest[:, dim] == level, dim].mean() for level in range(4)]
        np.testing.assert_allclose(levels[dim], means, atol=2e-3)


def test_the_codec_sample_is_uniform_over_the_stream_in_one_buffer():
    """The codec task keeps at most train_sample tokens of a stream of any length; each is kept with the same
    chance wherever it comes, not the front of the collection."""
    from td_ray.index.core import TokenReservoir

    reservoir = TokenReservoir(5_000, seed=3)
    buffer = None
    for start in range(0, 200_000, 7_919):  # uneven batches, as documents come
        reservoir.add(np.arange(start, min(start + 7_919, 200_000), dtype=np.float32)[:, None])
        buffer = reservoir.buffer if buffer is None else buffer
        assert reservoir.buffer is buffer  # one buffer, allocated once
    kept = reservoir.sample[:, 0]
    assert reservoir.seen == 200_000 and len(kept) == 5_000 and len(np.unique(kept)) == 5_000
    per_tenth = np.bincount((kept // 20_000).astype(int), minlength=10)
    assert per_tenth.min() > 400 and per_tenth.max() < 600, per_tenth  # 500 expected in each tenth


def test_the_paper_configs_state_the_codec_tasks_memory_from_its_formula():
    """Each paper config's header gives the codec task's memory; it must be what `plaid.codec_task_bytes` says for
    the config's train_sample at dim 128 and the centroids PLAID's rule gives its collection (stated beside)."""
    import re

    from td_ray.config import load_config

    configs = sorted((Path(__file__).parents[1] / "configs" / "paper").glob("*.yaml"))
    assert len(configs) == 12
    for path in configs:
        config = load_config(path)
        text = path.read_text()
        centroids = 2 ** int(re.search(r"PLAID's rule gives 2\^(\d+) centroids", text).group(1))
        expected = plaid.codec_task_bytes(config.index.train_sample, 128, centroids) / 1e9
        stated = re.search(r"codec task holds about ([\d.]+) GB", text)
        assert stated, f"{path.name}: the header does not state the codec task's memory"
        assert float(stated.group(1)) == round(expected, 1), path.name


def test_a_sharded_build_equals_one_shard_from_the_same_codec(clustered, tmp_path):
    tokens, offsets, _ = clustered
    codec = plaid.ResidualCodec.train(tokens, 64, 2)
    single = build(tmp_path / "one", codec, tokens, offsets, shards=1)
    assert build(tmp_path / "five", codec, tokens, offsets, shards=5) == single
    for name in plaid.FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "five" / name).read_bytes(), name
    assert not list((tmp_path / "five").glob("ivf-*"))  # the shards' lists were merged and removed

    # each centroid lists exactly the passages holding one of its tokens, ascending, once; each passage lists its
    # distinct centroids, ascending, once
    lists, list_offsets = np.load(tmp_path / "one" / plaid.IVF), np.load(tmp_path / "one" / plaid.IVF_OFFSETS)
    cells = np.load(tmp_path / "five" / plaid.PASSAGE_CELLS)
    cell_offsets = np.load(tmp_path / "five" / plaid.PASSAGE_CELL_OFFSETS)
    ids, _ = codec.encode(tokens)
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    for centroid in (0, 7, 63):
        listed = lists[list_offsets[centroid]:list_offsets[centroid + 1]]
        assert listed.tolist() == sorted(set(owner[ids == centroid].tolist()))
    for passage in (0, 59, 60, 299):  # 59 and 60 end and start shards of the five
        own = cells[cell_offsets[passage]:cell_offsets[passage + 1]]
        assert own.tolist() == sorted(set(ids[offsets[passage]:offsets[passage + 1]].tolist()))


def test_search_at_8_bits_equals_exact_maxsim_and_2_bits_keeps_its_top_10(clustered, tmp_path):
    tokens, offsets, queries = clustered
    exact_scores, exact_ids = exhaustive_search(tokens, offsets, queries, 10)
    everything = plaid.SearchSettings(ncells=64, centroid_score_threshold=None, ndocs=10**6)
    meta = build(tmp_path / "8", plaid.ResidualCodec.train(tokens, 64, 8), tokens, offsets, shards=2)
    scores, ids = plaid.TokenIndex(tmp_path / "8", meta, everything).search(queries, 10)
    # rank by rank a passage of the exact score there: the same ranking up to passages whose exact scores tie
    # within 8-bit error (the 10th and 11th of query 1 differ by 3e-4)
    for query, found, expected in zip(queries, ids, exact_scores):
        np.testing.assert_allclose(maxsim_scores(query, tokens, offsets, found), expected, atol=1e-3)
    assert np.mean(ids == exact_ids) >= 0.95
    np.testing.assert_allclose(scores, exact_scores, atol=0.02)

    meta = build(tmp_path / "2", plaid.ResidualCodec.train(tokens, 64, 2), tokens, offsets, shards=2)
    defaults = plaid.SearchSettings.for_depth(10)
    assert defaults == plaid.SearchSettings(1, 0.5, 256)
    for ram_bytes in (None, 0):  # the arrays in RAM, or every one memory-mapped: the same results
        _, ids = plaid.TokenIndex(tmp_path / "2", meta, defaults, ram_bytes=ram_bytes).search(queries, 10)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist())])
        assert overlap >= 0.9, overlap


def test_few_candidates_are_decoded_and_a_long_query_or_a_stale_index_is_refused(clustered, tmp_path, monkeypatch):
    """Search decodes only a quarter of ndocs (PLAID's), chosen by approximate scores over the candidates, which
    skip pruned centroids; the exact scores are MaxSim over the decoded tokens."""
    tokens, offsets, queries = clustered
    meta = build(tmp_path / "i", plaid.ResidualCodec.train(tokens, 64, 4), tokens, offsets, shards=3)
    index = plaid.TokenIndex(tmp_path / "i", meta, plaid.SearchSettings(ncells=1, centroid_score_threshold=0.3,
                                                                       ndocs=48))
    query = torch.from_numpy(queries[0])
    centroid_scores = query @ index.centroid_vectors.T
    candidates = index.candidates(centroid_scores)
    assert 48 < len(candidates) < 300  # one cell per query token lists some passages, not all
    decoded = []
    original = index.exact_scores
    monkeypatch.setattr(index, "exact_scores", lambda q, passages: decoded.append(passages) or original(q, passages))
    scores, ids = index.search_one(query, centroid_scores, 5)
    assert len(decoded) == 1 and len(decoded[0]) == 12 and set(decoded[0]) <= set(candidates.tolist())
    assert set(ids.tolist()) <= set(decoded[0].tolist()) and len(ids) == 5
    vectors, counts = index.decode_passages(ids)
    np.testing.assert_allclose(scores, maxsim_scores(queries[0], vectors.numpy(), np.concatenate([[0], np.cumsum(
        counts)]), np.arange(5)), rtol=1e-5)

    # pruning: a centroid no query token scores 0.3 or more counts 0, and is skipped
    table = centroid_scores.T.contiguous()
    kept = table.max(dim=1).values >= 0.3
    assert 0 < int(kept.sum()) < 64
    pruned = index.approximate_scores(table, candidates, kept).numpy()
    full = index.approximate_scores(table, candidates, None).numpy()
    for row, passage in enumerate(candidates[:20]):
        own = np.unique(index.centroid_ids[offsets[passage]:offsets[passage + 1]]).astype(np.int64)
        per_token = table[own].numpy()
        np.testing.assert_allclose(full[row], per_token.max(axis=0).sum(), rtol=1e-5)
        masked = np.where(kept.numpy()[own][:, None], per_token, 0.0)
        np.testing.assert_allclose(pruned[row], np.maximum(masked.max(axis=0), 0).sum(), rtol=1e-5)

    with pytest.raises(plaid.QueryTooLongError, match="longer than the student's query_maxlen \\(8\\)"):
        index.search(np.concatenate([queries[:1], queries[1:2]], axis=1), 5)
    with pytest.raises(StaleIndexError, match="re-run the index stage"):
        plaid.TokenIndex(tmp_path / "i", meta | {"tokens": meta["tokens"] + 1}, index.settings)


def test_maxsim_scores_agree_with_the_students_maxsim(clustered):
    tokens, offsets, queries = clustered
    chosen = np.array([3, 0, 17, 299])
    width = max(offsets[j + 1] - offsets[j] for j in chosen)
    padded = torch.zeros(len(chosen), width, 32)
    mask = torch.zeros(len(chosen), width, dtype=torch.bool)
    for row, j in enumerate(chosen):
        length = offsets[j + 1] - offsets[j]
        padded[row, :length], mask[row, :length] = torch.from_numpy(tokens[offsets[j]:offsets[j + 1]]), True
    expected = maxsim(torch.from_numpy(queries[:1]), torch.ones(1, 8), padded, mask)[0].numpy()
    got = maxsim_scores(queries[0], tokens, offsets, chosen, chunk=3)  # chunk 3 splits them over two chunks
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_demo_collection_at_2_bits_keeps_exact_maxsims_top_10_documents(make_workspace, colbert_student, tmp_path):
    """The demo's evaluation collection encoded by the lexical ColBERT student, compressed at 2 bits and searched
    with PLAID's defaults for 100 passages, against exact MaxSim over every passage's original vectors, both
    aggregated to documents by MaxP."""
    from td_ray.sources import ingest

    config = make_workspace()
    workspace = Workspace(config.workspace)
    ingest(workspace, config.data.eval_docs, "docs", "eval_docs")
    ingest(workspace, config.data.eval_topics, "queries", "eval_topics")
    docs = workspace.read_table(EVAL_DOCS)
    encoder = ColBERTStudentEncoder(colbert_student, max_length=config.index.max_length)
    encoded = encoder.encode_documents(docs["text"].to_pylist())
    tokens = np.concatenate(encoded)
    offsets = np.concatenate([[0], np.cumsum([len(vectors) for vectors in encoded])])
    queries = encoder.encode_queries(workspace.read_table(EVAL_TOPICS)["text"].to_pylist())
    docids = np.asarray(docs["id"].to_pylist(), dtype=object)
    exact = maxp(*exhaustive_search(tokens, offsets, queries, 100), lambda found: docids[found], 10)

    codec = plaid.ResidualCodec.train(tokens, plan_centroids(None, len(tokens), len(tokens)), 2)
    meta = build(tmp_path / "demo", codec, tokens, offsets, shards=3)
    searcher = plaid.TokenIndex(tmp_path / "demo", meta, plaid.SearchSettings.for_depth(100))
    compressed = maxp(*searcher.search(queries, 100), lambda found: docids[found], 10)
    kept = sum(len({d for d, _ in a} & {d for d, _ in b}) for a, b in zip(exact, compressed))
    assert kept >= 9 * len(exact), kept / (10 * len(exact))  # at least 0.9 of exact's top 10, counted exactly


def test_index_and_evaluate_a_registered_colbert_student(make_workspace, colbert_student, ray_cluster, monkeypatch,
                                                         tmp_path):
    """The stages with `index.model: models:/...@candidate`, 8-bit residuals, three shard tasks (one SIGKILLed once
    and retried): every passage's tokens decode to its own token vectors, the run equals exact MaxSim's with every
    candidate decoded, and an index built with other settings is refused."""
    import mlflow

    from td_ray import evaluate, index, tracking
    from td_ray.distill.registry import register_student
    from td_ray.retrieval.layout import build_path, read_index_meta
    from td_ray.retrieval.maxp import PassageMap

    config = make_workspace(index={"model": "models:/colbert-x@candidate", "num_shards": 3,
                                   "colbert": {"nbits": 8}},
                            evaluate={"ncells": 4096, "ndocs": 100_000, "centroid_score_threshold": -1})
    tracking.configure(config)
    with mlflow.start_run():
        register_student(colbert_student, "colbert-x", "candidate", {"td_ray.student_kind": "colbert"})
    marker = tmp_path / "killed-once"
    original = index.token_shard_task

    def killed_once(*args):
        if args[2] == 1 and not marker.exists():  # shard 1, first attempt: the worker dies mid-task
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args)

    monkeypatch.setattr(index, "token_shard_task", killed_once)
    built = index.run(config)
    assert marker.exists()
    workspace = Workspace(config.workspace)
    meta = read_index_meta(workspace)
    assert Path(meta["model"]).parts[-4:] == ("models", "colbert-x-v1", "artifacts", "student")
    assert meta["kind"] == "colbert" and meta["nbits"] == 8 and meta["query_maxlen"] == 8
    assert built.metrics["passages"] == sum(built.metrics[f"shard_{i}_size"] for i in range(3)) == meta["passages"]
    assert not (build_path(workspace, meta) / "codes.parquet").exists()  # only the memory-mapped arrays stay

    # every passage's token rows decode to its own tokens, encoded directly, within the codec's bound
    docs = workspace.read_table(EVAL_DOCS)
    encoder = ColBERTStudentEncoder(colbert_student, max_length=config.index.max_length)
    direct = dict(zip(docs["id"].to_pylist(), encoder.encode_documents(docs["text"].to_pylist())))
    searcher = plaid.TokenIndex(build_path(workspace, meta), meta, plaid.SearchSettings(4096, None, 10**6))
    passages = PassageMap(build_path(workspace, meta, "passages.arrow"))
    numbers = np.arange(meta["passages"])
    assert sorted(passages.docids(numbers).tolist()) == sorted(direct) and meta["tokens"] == sum(
        len(vectors) for vectors in direct.values())
    offsets = searcher.offsets
    decoded = searcher.codec.decode(searcher.centroid_ids[:], searcher.residuals[:]).numpy()
    for number, docid in zip(numbers, passages.docids(numbers)):
        error = np.abs(decoded[offsets[number]:offsets[number + 1]] - direct[docid])
        assert error.max() <= meta["error_bound"] + 1e-5, docid

    # with every candidate decoded, the 8-bit run ranks documents as exact MaxSim does
    result = evaluate.run(config)
    topics = workspace.read_table(EVAL_TOPICS)
    queries = encoder.encode_queries(topics["text"].to_pylist())
    docids = np.asarray(list(direct), dtype=object)
    tokens = np.concatenate(list(direct.values()))
    exact_offsets = np.concatenate([[0], np.cumsum([len(vectors) for vectors in direct.values()])])
    exact = maxp(*exhaustive_search(tokens, exact_offsets, queries, len(docids)), lambda found: docids[found],
                 len(docids))
    run = workspace.read_table(RUN).to_pylist()
    for qid, expected in zip(topics["id"].to_pylist(), exact):
        got = [(row["docid"], row["score"]) for row in run if row["qid"] == qid][:10]
        exact_score = dict(expected)
        # rank by rank, a document of the exact run's score: the same ranking, up to the order of documents whose
        # exact scores tie within 8-bit error (1e-3 of a MaxSim of about 5)
        np.testing.assert_allclose([exact_score[docid] for docid, _ in got], [s for _, s in expected[:10]],
                                   atol=1e-3, err_msg=qid)
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected[:10]], atol=0.02)
    assert 0 < result.metrics["nDCG@20"] <= 1

    # the topics spread over three Ray search tasks, each mapping the index once: the same run
    spread = evaluate.run(with_updates(config, evaluate={"search_tasks": 3, "search_cpus": 0.5}))
    assert workspace.read_table(RUN).to_pylist() == run and spread.metrics == result.metrics

    # an index of other settings is refused, naming the fix; so is a dense student on a ColBERT index
    with pytest.raises(StaleIndexError, match="other index settings .* re-run the index stage"):
        evaluate.run(with_updates(config, index={"colbert": {"nbits": 2}}))
    dense = with_updates(config, index={"model": str(Path(config.workspace) / "tiny-models" / "student")})
    with pytest.raises(StaleIndexError, match="saved index is colbert but .* is a dense student"):
        evaluate.run(dense)


def test_a_long_query_is_cut_to_the_students_query_maxlen(colbert_student):
    encoder = ColBERTStudentEncoder(colbert_student)
    long = " ".join(["river stone lake"] * 40)
    vectors = encoder.encode_queries([long, "lake"])
    assert vectors.shape == (2, 8, 32)
    np.testing.assert_allclose(vectors[0], encoder.encode_queries([" ".join(["river stone lake"] * 3)])[0],
                               atol=1e-5)


def test_appended_passages_give_the_files_of_a_rebuild_and_deleted_ones_leave_the_results(clustered, tmp_path):
    """Passages added after a build are compressed with the built codec and appended: the arrays grow in place and
    the lists are merged after the built ones, so the files equal those of one build of every passage (search then
    equals a rebuild's exactly); a deleted passage never comes back; an append that did not finish is cut back."""
    tokens, offsets, queries = clustered
    codec = plaid.ResidualCodec.train(tokens, 64, 2)
    full = build(tmp_path / "full", codec, tokens, offsets, shards=2)
    first = 270
    built = build(tmp_path / "grown", codec, tokens[:offsets[first]], offsets[:first + 1], shards=2)
    grown = tmp_path / "grown"
    previous = plaid.Layout(first, int(offsets[first]), codec.code_bytes, codec.id_dtype.str, codec.nlist)
    layout = plaid.Layout(300, len(tokens), codec.code_bytes, codec.id_dtype.str, codec.nlist)
    ids, residuals = codec.encode(tokens[offsets[first]:])
    counts = np.diff(offsets[first:])
    pq.write_table(pa.table({"faiss_id": np.arange(first, 300), "first_token": offsets[first:-1],
                             "tokens": counts.astype(np.int32), "centroid_ids": plaid.per_passage_bytes(ids, counts),
                             "residuals": plaid.per_passage_bytes(residuals, counts)}), grown / "append.parquet",
                   row_group_size=7)
    layout.resize(grown)
    for shard, (start, end) in enumerate(plaid.shard_ranges(30, 2)):
        plaid.write_shard(grown / "append.parquet", grown, shard, first + start, first + end, layout)
    plaid.merge_lists(grown, [0, 1], layout, previous)
    for name in plaid.FILES:
        assert (tmp_path / "full" / name).read_bytes() == (grown / name).read_bytes(), name
    assert built["passages"] == first

    everything = plaid.SearchSettings(ncells=64, centroid_score_threshold=None, ndocs=10**6)
    _, ids_full = plaid.TokenIndex(tmp_path / "full", full, everything).search(queries, 10)
    assert add_deleted(grown, ids_full[:, 0]) == len(set(ids_full[:, 0].tolist()))
    _, ids_grown = plaid.TokenIndex(grown, full, everything).search(queries, 10)
    deleted = set(ids_full[:, 0].tolist())
    assert not set(ids_grown.ravel().tolist()) & deleted
    for found, before in zip(ids_grown.tolist(), ids_full.tolist()):  # the rest keep their order
        kept = [passage for passage in before if passage not in deleted]
        assert found[:len(kept)] == kept

    previous.resize(grown)  # an append cut back: the built passages' arrays as they were
    assert np.load(grown / plaid.OFFSETS).tolist() == np.load(tmp_path / "full" / plaid.OFFSETS)[:first + 1].tolist()[
        :-1] + [offsets[first]]
    assert np.array_equal(np.load(grown / plaid.CENTROID_IDS), codec.encode(tokens[:offsets[first]])[0])


def test_the_paper_configs_state_the_projection_the_benchmark_made():
    """Each paper config's header gives its index's build hours and search ms on 8 H100s as
    bench/results/colbert_index.json projects them for its collection (marked as projected there)."""
    import json
    import re

    root = Path(__file__).parents[1]
    projection = json.loads((root / "bench" / "results" / "colbert_index.json").read_text())["paper_projection"]
    for path in sorted((root / "configs" / "paper").glob("*.yaml")):
        collection = "mtd" if path.name.startswith("mtd") else path.stem.rsplit("-", 1)[-1]
        figures = projection["collections"][collection]
        words = " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))
        stated = re.search(r"no GPU ran it\): the index builds in about ([\d.]+) h .* answers a query in about "
                           r"([\d.]+) ms", words)
        assert stated, f"{path.name}: the header does not state the projection"
        assert float(stated.group(1)) == figures["projected_build_hours_8_h100"]["total"], path.name
        assert float(stated.group(2)) == figures["projected_search_ms_a_query"], path.name
