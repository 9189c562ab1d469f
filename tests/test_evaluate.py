"""evaluate: ranking, TREC run files, and ir_measures metrics checked by hand and against trec_eval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import ir_measures
import pyarrow as pa
import pytest
from conftest import REALDATA

from td_ray.config import TrecQrelsSource, TrecRunSource
from td_ray.evaluate.core import MeasureError, evaluate_run, parse_measures
from td_ray.sources import iter_rows
from td_ray.workspace import RUN, RUN_TREC, Workspace


def _run(rows):
    return pa.table({"qid": [r[0] for r in rows], "docid": [r[1] for r in rows],
                     "rank": pa.array([r[2] for r in rows], pa.int32()), "score": pa.array([r[3] for r in rows], pa.float32())})


def test_metrics_equal_a_hand_checked_run():
    qrels = pa.table({"qid": ["q1", "q1", "q1", "q2"], "docid": ["d1", "d2", "d3", "d9"],
                      "relevance": pa.array([2, 1, 0, 1], pa.int32())})
    run = _run([("q1", "d3", 1, 3.0), ("q1", "d1", 2, 2.0), ("q1", "x", 3, 1.0), ("q1", "d2", 4, 0.5),
                ("q2", "a", 1, 2.0), ("q2", "b", 2, 1.0)])
    metrics, per_query = evaluate_run(run, qrels, ["nDCG@20", "R@100", "RR@10"])
    # q1: gains at ranks 2 and 4 are 2 and 1; ideal ranking puts 2 then 1.
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    # q2 retrieves nothing relevant: nDCG 0, recall 0, RR 0.
    assert metrics["nDCG@20"] == pytest.approx((dcg / ideal + 0) / 2, abs=1e-6)
    assert metrics["R@100"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["RR@10"] == pytest.approx((1 / 2 + 0) / 2)
    values = {(row["qid"], row["measure"]): row["value"] for row in per_query.to_pylist()}
    assert values[("q1", "RR@10")] == pytest.approx(0.5) and values[("q2", "nDCG@20")] == 0.0


def test_unknown_measure_is_named():
    with pytest.raises(MeasureError, match="'nDCG@@20'"):
        parse_measures(["nDCG@@20"])


def test_pipeline_run_file_and_metrics_agree_with_ir_measures(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    trec = Path(workspace.path(RUN_TREC))
    lines = trec.read_text().splitlines()
    topics = workspace.read_table("inputs/eval_topics.parquet").num_rows
    assert len(lines) == topics * min(config.evaluate.depth, workspace.read_table("inputs/eval_docs.parquet").num_rows)
    assert all(len(line.split()) == 6 and line.split()[1] == "Q0" for line in lines)
    assert workspace.read_table(RUN).num_rows == len(lines)
    qrels = list(ir_measures.read_trec_qrels(str(Path(config.workspace) / "demo" / "eval_qrels.txt")))
    expected = ir_measures.calc_aggregate([ir_measures.nDCG @ 20, ir_measures.R @ 100, ir_measures.RR @ 10],
                                          qrels, list(ir_measures.read_trec_run(str(trec))))
    assert results["evaluate"].metrics["nDCG@20"] == pytest.approx(expected[ir_measures.nDCG @ 20], abs=1e-4)
    assert results["evaluate"].metrics["R@100"] == pytest.approx(expected[ir_measures.R @ 100], abs=1e-4)
    assert results["evaluate"].metrics["RR@10"] == pytest.approx(expected[ir_measures.RR @ 10], abs=1e-4)


@pytest.mark.skipif(not (REALDATA / "eval_oracle").is_dir(), reason="../shared/realdata is absent")
def test_matches_trec_eval_on_its_own_test_files():
    oracle = json.loads((REALDATA / "eval_oracle" / "trec_eval_expected.json").read_text())["binary_qrels_run"]
    folder = REALDATA / "eval_oracle"
    qrels_rows = list(iter_rows(TrecQrelsSource(format="trec_qrels", path=str(folder / oracle["qrels"])), "qrels"))
    run_rows = list(iter_rows(TrecRunSource(format="trec_run", path=str(folder / oracle["run"])), "candidates"))
    qrels = pa.table({"qid": [r[0] for r in qrels_rows], "docid": [r[1] for r in qrels_rows],
                      "relevance": pa.array([r[2] for r in qrels_rows], pa.int32())})
    metrics, _ = evaluate_run(_run(run_rows), qrels, ["nDCG@20", "R@100", "RR"])
    expected = oracle["expected"]
    assert metrics["nDCG@20"] == pytest.approx(expected["ndcg_cut_20"]["all"], abs=1e-4)
    assert metrics["R@100"] == pytest.approx(expected["recall_100"]["all"], abs=1e-4)
    assert metrics["RR"] == pytest.approx(expected["recip_rank"]["all"], abs=1e-4)
