"""index, incremental: documents added, changed or removed after a build are appended to it (encoded once, with the
build's trained quantiser or codec) and their old passages leave the results; the run then equals a rebuild's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import with_updates
from td_ray.retrieval.layout import DOCUMENTS, build_path, read_index_meta
from td_ray.workspace import RUN, Workspace

NEW = 24
"""Documents added after the first build: a tenth of the demo's 240."""


def collections(config) -> tuple[Path, Path]:
    """The demo's documents as two TSV files: `before` lacks the last NEW documents; `after` has them, drops d1
    and changes d2's text (to d3's, so both now rank alike)."""
    lines = Path(config.data.eval_docs.path).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 240
    before = Path(config.workspace) / "before.tsv"
    after = Path(config.workspace) / "after.tsv"
    before.write_text("\n".join(lines[:-NEW]) + "\n", encoding="utf-8")
    changed = [line for line in lines if not line.startswith("d1\t")]
    changed[1] = "d2\t" + lines[3].split("\t", 1)[1]
    after.write_text("\n".join(changed) + "\n", encoding="utf-8")
    return before, after


def with_docs(config, path: Path):
    return with_updates(config, data={"eval_docs": {**config.data.eval_docs.model_dump(mode="json"),
                                                    "path": str(path)}})


def index_then_append(config):
    """The index built over `before`, then run over `after`: (the build's result, the append's, the last config)."""
    from td_ray import index

    before, after = collections(config)
    first, second = with_docs(config, before), with_docs(config, after)
    return index.run(first), index.run(second), second


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_appended_documents_give_a_dense_run_equal_to_a_rebuilds(make_workspace, ray_cluster, factory):
    from td_ray import evaluate, index

    config = make_workspace(index={"factory": factory, "train_sample": 1000})
    config = with_updates(config, index={"model": str(Path(config.workspace) / "tiny-models" / "student")},
                          evaluate={"search_params": "nprobe=4" if factory.startswith("IVF") else None})
    built, appended, after = index_then_append(config)
    meta = read_index_meta(Workspace(after.workspace))
    assert appended.metrics["appended_documents"] == NEW + 1  # the new ones and the changed d2, nothing else
    assert appended.metrics["encoded_documents"] <= 0.15 * built.rows
    assert appended.metrics["deleted_passages"] == 2 and meta["deleted_passages"] == 2  # d1's and d2's old passage
    assert meta["docs"] == 239 and len(meta["appended"]) == 1 and len(meta["passage_maps"]) == 2
    assert any(name.startswith("append-0001-shard-") for name in meta["files"])
    result = evaluate.run(after)
    run = Workspace(after.workspace).read_table(RUN).to_pylist()
    assert "d1" not in {row["docid"] for row in run}

    rebuilt_config = make_workspace(index=after.index.model_dump(mode="json"),
                                    evaluate=after.evaluate.model_dump(mode="json"))
    rebuilt_config = with_docs(rebuilt_config, Path(after.data.eval_docs.path))
    index.run(rebuilt_config)
    rebuilt = evaluate.run(rebuilt_config)
    other = Workspace(rebuilt_config.workspace).read_table(RUN).to_pylist()
    assert [(r["qid"], r["docid"]) for r in run] == [(r["qid"], r["docid"]) for r in other]
    np.testing.assert_allclose([r["score"] for r in run], [r["score"] for r in other], rtol=1e-5, atol=1e-5)
    assert result.metrics == pytest.approx(rebuilt.metrics, abs=1e-9)

    again = index.run(after)  # nothing changed since the append: the index is reused as it is
    assert again.metrics.get("unchanged") == 1.0
    assert build_path(Workspace(after.workspace), read_index_meta(Workspace(after.workspace)), DOCUMENTS).is_file()


def test_appended_documents_join_a_colbert_index_with_its_codec(make_workspace, ray_cluster, colbert_student):
    """ColBERT: the new and changed documents are compressed with the built codec (not trained again) and appended;
    appending a tenth of the collection encodes at most 15 % of what a rebuild encodes (every document, and the
    codec's sample). A rebuild trains its own codec, so the runs agree within a stated tolerance: a mean top-10
    overlap of at least 0.9 and nDCG@20 within 0.03 (measured: 1.0 and 0.0)."""
    from td_ray import evaluate, index
    from td_ray.retrieval import plaid

    config = make_workspace(index={"model": str(colbert_student), "colbert": {"nbits": 4}})
    workspace = Workspace(config.workspace)
    before, after_docs = collections(config)
    built = index.run(with_docs(config, before))
    codec_before = (build_path(workspace, read_index_meta(workspace)) / plaid.CODEC).read_bytes()
    after = with_docs(config, after_docs)
    appended = index.run(after)
    meta = read_index_meta(workspace)
    build = build_path(workspace, meta)
    sampled = built.metrics["codec_sample_documents"]  # what a rebuild encodes besides every document
    assert appended.metrics["appended_documents"] == NEW + 1 and appended.metrics["deleted_passages"] == 2
    assert appended.metrics["encoded_documents"] <= 0.15 * (built.rows + sampled)
    assert (build / plaid.CODEC).read_bytes() == codec_before
    assert meta["passages"] == built.metrics["passages"] + NEW + 1
    assert plaid.lists_match(build, plaid.Layout(meta["passages"], meta["tokens"], meta["code_bytes"],
                                                 meta["id_dtype"], meta["centroids"]), meta["ivf_entries"])
    result = evaluate.run(after)
    run = workspace.read_table(RUN).to_pylist()
    assert "d1" not in {row["docid"] for row in run}

    rebuilt_config = with_docs(make_workspace(index=after.index.model_dump(mode="json")),
                               Path(after.data.eval_docs.path))
    index.run(rebuilt_config)
    rebuilt = evaluate.run(rebuilt_config)
    other = Workspace(rebuilt_config.workspace).read_table(RUN).to_pylist()

    def top(rows, qid):
        return [row["docid"] for row in rows if row["qid"] == qid][:10]

    qids = sorted({row["qid"] for row in run})
    overlap = np.mean([len(set(top(run, qid)) & set(top(other, qid))) / 10 for qid in qids])
    assert overlap >= 0.9, overlap
    assert abs(result.metrics["nDCG@20"] - rebuilt.metrics["nDCG@20"]) <= 0.03
