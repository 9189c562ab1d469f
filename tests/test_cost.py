"""What a run costs: each stage's reserved hours priced by the config, and the reference job projected from the rates
a run measured, never passing a CPU rate off as a GPU one."""
from __future__ import annotations

import pytest

from td_ray.cost import REFERENCE_JOB, project, usage_cost

CONFIG = {"translate": {"num_actors": 2, "num_cpus_per_actor": 1, "num_gpus_per_actor": 0, "translate_queries": True},
          "score": {"num_actors": 8, "num_cpus_per_actor": 1, "num_gpus_per_actor": 1, "tokenizers": 4,
                    "num_cpus_per_tokenizer": 1},
          "distill": {"num_workers": 8, "cpus_per_worker": 4, "use_gpu": True, "gpus_per_worker": 1},
          "index": {"num_actors": 1, "max_actors": 4, "num_cpus_per_actor": 2, "num_gpus_per_actor": 0.5}}


def test_a_stage_is_priced_only_where_every_resource_it_used_has_a_price():
    assert usage_cost(1800, 7200, {"cpu_hour": 0.1, "gpu_hour": 2.0}) == pytest.approx(
        {"cpu_hours": 0.5, "gpu_hours": 2.0, "cost": 4.05})
    assert "cost" not in usage_cost(1800, 7200, {"cpu_hour": 0.1, "gpu_hour": None})
    assert usage_cost(1800, 0, {"cpu_hour": 0.1, "gpu_hour": None})["cost"] == pytest.approx(0.05)


def test_the_reference_job_divides_its_work_by_the_measured_rates_with_the_runs_pools():
    metrics = {"translate": {"translated_rows": 1000.0, "translate_seconds": 10.0, "gpu_seconds": 0.0},
               "score": {"teacher_steady_pairs_per_s": 2650.0, "gpu_seconds": 120.0},
               "distill": {"steps_per_s": 5.0, "gpu_seconds": 300.0},
               "index": {"encode_steady_passages_per_s": 0.0, "passages_per_doc": 3.0, "gpu_seconds": 1.0},
               "evaluate": {"gpu_seconds": 0.0}}
    projected = {item.stage: item for item in project(CONFIG, metrics, {"cpu_hour": 0.1, "gpu_hour": 2.0})}
    assert set(projected) == {"translate", "score", "distill"}  # index measured no rate: nothing projected
    translate = projected["translate"]
    rows = REFERENCE_JOB["passages"] + REFERENCE_JOB["queries"]
    assert translate.hours == pytest.approx(rows / 100 / 3600) and translate.measured_on == "CPU"
    assert (translate.cpu_hours, translate.gpu_hours) == (pytest.approx(2 * translate.hours), 0.0)
    score = projected["score"]
    assert score.hours == pytest.approx(REFERENCE_JOB["pairs"] / 2650 / 3600) and score.measured_on == "GPU"
    assert score.gpu_hours == pytest.approx(8 * score.hours) and score.cpu_hours == pytest.approx(12 * score.hours)
    assert score.cost == pytest.approx(score.cpu_hours * 0.1 + score.gpu_hours * 2.0)
    distill = projected["distill"]
    assert distill.hours == pytest.approx(200_000 / 5 / 3600) and distill.gpu_hours == pytest.approx(8 * distill.hours)
    unpriced = project(CONFIG, metrics, {"cpu_hour": 0.1})
    assert [item.cost is None for item in unpriced] == [False, True, True]  # GPU-hours without a GPU price


def test_each_stage_of_the_pipeline_reports_its_hours_and_cost(pipeline_run):
    config, results = pipeline_run
    for result in results.values():
        used = result.usage
        assert used["cpu_hours"] == pytest.approx(used["cpu_seconds"] / 3600)
        assert used["cost"] == pytest.approx(used["cpu_hours"] * config.cost.cpu_hour
                                             + used["gpu_hours"] * config.cost.gpu_hour)
        assert f"{used['cpu_hours']:.4f} CPU-h" in result.summary() and "USD" in result.summary()
    assert results["score"].usage["cpu_seconds"] > 0
