"""index and evaluate with a ColBERT-X student: a token index, exact MaxSim over its candidates, one stage run."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from td_ray.encoders.colbert import (
    ColBERTSpec,
    ColBERTStudentEncoder,
    load_colbert,
    maxsim,
)
from td_ray.retrieval.maxsim import (
    build_shard,
    colbert_search,
    maxsim_scores,
    merge_shards,
    stored_ids,
    vectors_by_id,
)
from td_ray.workspace import (
    DOC_IDS,
    EVAL_DOCS,
    EVAL_TOPICS,
    FAISS_INDEX,
    INDEX_META,
    RUN,
    TOKEN_DOCS,
    TOKEN_EMBEDDINGS,
    Workspace,
)


def unit(rng, *shape):
    vectors = rng.normal(size=shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def brute_force_maxsim(query, documents):
    """Per document, by plain loops: the sum over query tokens of the best dot product with a document token."""
    return np.array([sum(max(float(q @ d) for d in doc) for q in query) for doc in documents])


@pytest.fixture(scope="module")
def collection():
    """40 documents of 1 to 12 unit token vectors, in a token index built from 3 interleaved shards (so the
    merged index stores the token rows out of order), and 5 queries of 6 tokens."""
    rng = np.random.default_rng(0)
    documents = [unit(rng, int(n), 8) for n in rng.integers(1, 13, size=40)]
    offsets = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])])
    shards = []
    for shard in range(3):
        numbers = range(shard, 40, 3)
        shards.append(build_shard(np.concatenate([documents[j] for j in numbers]),
                                  np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in numbers])))
    index = merge_shards(shards, 8)
    return index, documents, offsets, unit(rng, 5, 6, 8)


def test_token_vectors_come_back_in_token_row_order(collection):
    index, documents, offsets, _ = collection
    assert not np.array_equal(stored_ids(index), np.arange(index.ntotal))  # stored in shard order, not token order
    np.testing.assert_array_equal(vectors_by_id(index), np.concatenate(documents))
    assert offsets[-1] == index.ntotal


def test_search_equals_brute_force_maxsim_when_every_token_is_a_hit(collection):
    index, documents, offsets, queries = collection
    token_vectors = vectors_by_id(index)
    scores, ids = colbert_search(index, token_vectors, offsets, queries, depth=10, hits_per_token=index.ntotal)
    assert scores.shape == ids.shape == (5, 10)
    for query, row_scores, row_ids in zip(queries, scores, ids):
        exact = brute_force_maxsim(query, documents)
        assert row_ids.tolist() == np.argsort(-exact)[:10].tolist()
        np.testing.assert_allclose(row_scores, np.sort(exact)[::-1][:10], rtol=1e-5, atol=1e-5)
    # depth beyond the collection: every document, once, and no padding
    _, everything = colbert_search(index, token_vectors, offsets, queries, depth=100, hits_per_token=index.ntotal)
    assert everything.shape == (5, 40) and all(sorted(row) == list(range(40)) for row in everything.tolist())


def test_few_hits_per_token_keep_only_the_hit_documents_and_score_them_exactly(collection):
    index, documents, offsets, queries = collection
    token_vectors = vectors_by_id(index)
    scores, ids = colbert_search(index, token_vectors, offsets, queries, depth=40, hits_per_token=2)
    owner = np.repeat(np.arange(40), np.diff(offsets))
    for query, row_scores, row_ids in zip(queries, scores, ids):
        hit_docs = {int(owner[t]) for t in np.argsort(-(query @ token_vectors.T), axis=1)[:, :2].ravel()}
        kept = row_ids[row_ids >= 0]
        assert set(kept.tolist()) == hit_docs and len(kept) < 40  # candidates only: the rest is padding
        assert np.isneginf(row_scores[len(kept):]).all()
        exact = brute_force_maxsim(query, [documents[j] for j in kept])
        np.testing.assert_allclose(row_scores[:len(kept)], exact, rtol=1e-5, atol=1e-5)
        assert (np.diff(row_scores[:len(kept)]) <= 0).all()


def test_maxsim_scores_agree_with_the_students_maxsim(collection):
    _, documents, offsets, queries = collection
    chosen = np.array([3, 0, 17, 39])
    width = max(len(documents[j]) for j in chosen)
    padded = torch.zeros(len(chosen), width, 8)
    mask = torch.zeros(len(chosen), width, dtype=torch.bool)
    for row, j in enumerate(chosen):
        padded[row, :len(documents[j])], mask[row, :len(documents[j])] = torch.from_numpy(documents[j]), True
    expected = maxsim(torch.from_numpy(queries[:1]), torch.ones(1, 6), padded, mask)[0].numpy()
    # chunk=3 splits the documents over two chunks
    got = maxsim_scores(queries[0], np.concatenate(documents), offsets, chosen, chunk=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_index_and_evaluate_stages_with_a_colbert_student(make_workspace, ray_cluster, assets_root, tmp_path):
    from td_ray import evaluate, index
    from td_ray.errors import StaleIndexError

    torch.manual_seed(0)
    model, tokenizer = load_colbert(assets_root / "tiny-models" / "student",
                                    ColBERTSpec(dim=16, query_maxlen=8, doc_maxlen=32))
    student = tmp_path / "colbert"
    model.save_pretrained(student, tokenizer)
    config = make_workspace(index={"model": str(student)})
    index.run(config)
    result = evaluate.run(config)
    workspace = Workspace(config.workspace)

    docs = workspace.read_table(EVAL_DOCS)
    texts = dict(zip(docs["id"].to_pylist(), docs["text"].to_pylist()))
    table = workspace.read_table(TOKEN_EMBEDDINGS, columns=["docid", "passage", "faiss_id", "tokens"])
    assert sorted(table["docid"].to_pylist()) == sorted(texts)  # every (short) document, one passage each
    assert set(table["passage"].to_pylist()) == {0}
    encoder = ColBERTStudentEncoder(student, max_length=config.index.max_length)
    direct = dict(zip(texts, encoder.encode_documents(list(texts.values()))))
    token_index = faiss.read_index(workspace.path(FAISS_INDEX))
    assert token_index.ntotal == sum(len(vectors) for vectors in direct.values())
    meta = json.loads(Path(workspace.path(INDEX_META)).read_text())
    assert meta.pop("key") and meta == {"kind": "colbert", "dim": 16, "docs": len(texts), "passages": len(texts),
                                        "tokens": token_index.ntotal, "model": str(student)}

    # each document's token rows hold its own token vectors
    token_docs = workspace.read_table(TOKEN_DOCS)
    assert workspace.read_table(DOC_IDS).sort_by("faiss_id")["docid"].to_pylist() == token_docs["docid"].to_pylist()
    token_vectors = vectors_by_id(token_index)
    for row in token_docs.slice(0, 5).to_pylist() + token_docs.slice(token_docs.num_rows - 2).to_pylist():
        stored = token_vectors[row["first_token"]:row["first_token"] + row["tokens"]]
        np.testing.assert_allclose(stored, direct[row["docid"]], atol=1e-4)

    # the run's top document per topic carries its exact MaxSim score, and is at least as good as its runner-up
    topics = workspace.read_table(EVAL_TOPICS)
    queries = dict(zip(topics["id"].to_pylist(), encoder.encode_queries(topics["text"].to_pylist())))
    run = workspace.read_table(RUN).to_pylist()
    assert {row["qid"] for row in run} == set(queries) and result.metrics["nDCG@20"] > 0
    for qid, query in queries.items():
        ranked = [row for row in run if row["qid"] == qid]
        assert [row["rank"] for row in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) >= 10
        for row in ranked[:2]:
            vectors = torch.from_numpy(direct[row["docid"]])
            exact = maxsim(torch.from_numpy(query)[None], torch.ones(1, len(query)), vectors[None],
                           torch.ones(1, len(vectors), dtype=torch.bool))
            assert row["score"] == pytest.approx(float(exact), abs=1e-3)

    # searching it with a dense student is refused, not silently wrong
    dense = config.model_copy(update={"index": config.index.model_copy(update={"model": str(assets_root / "tiny-models" / "student")})})
    with pytest.raises(StaleIndexError, match="saved index is colbert but .* is a dense student"):
        evaluate.run(dense)
