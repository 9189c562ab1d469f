"""What a run costs, and what the paper's job would: reserved CPU- and GPU-hours priced by the config's `cost` table.

A stage's own figures come from what it reserved (`td_ray.usage`). The projection of the reference job (MS MARCO
into one language, 200 k distillation steps, NeuCLIR Chinese indexed) divides that job's work by the rates this run
measured, with this run's pools: a rate measured on CPUs projects a CPU run, and is marked so, never shown as a GPU
figure.
"""
from __future__ import annotations

from dataclasses import dataclass

REFERENCE_JOB = {"passages": 8_841_823, "queries": 530_000, "pairs": 530_000 * 50, "steps": 200_000,
                 "documents": 3_179_209}
"""MS MARCO v1 passages and the training queries the paper scores (50 candidates each), translated into one
language; the paper's 200 k steps; NeuCLIR 2022 Chinese documents."""


def usage_cost(cpu_seconds: float, gpu_seconds: float, prices: dict | None) -> dict[str, float]:
    """CPU- and GPU-hours, and their cost when `prices` (the config's `cost`) give a price for each one used.

    >>> usage_cost(7200, 1800, {"cpu_hour": 0.25, "gpu_hour": 2.0})
    {'cpu_hours': 2.0, 'gpu_hours': 0.5, 'cost': 1.5}
    >>> usage_cost(3600, 0, {"cpu_hour": None, "gpu_hour": 2.0})
    {'cpu_hours': 1.0, 'gpu_hours': 0.0}
    """
    hours = {"cpu_hours": cpu_seconds / 3600, "gpu_hours": gpu_seconds / 3600}
    cost = price(hours["cpu_hours"], hours["gpu_hours"], prices)
    return hours if cost is None else hours | {"cost": cost}


def price(cpu_hours: float, gpu_hours: float, prices: dict | None) -> float | None:
    """The cost of the hours, or None when a resource used has no price."""
    prices = prices or {}
    parts = [(cpu_hours, prices.get("cpu_hour")), (gpu_hours, prices.get("gpu_hour"))]
    if any(hours > 0 and rate is None for hours, rate in parts):
        return None
    return sum(hours * (rate or 0.0) for hours, rate in parts)


@dataclass
class Projection:
    """One stage of the reference job: its work, the rate this run measured, and the hours and cost it implies."""

    stage: str
    work: str
    rate: float
    unit: str
    measured_on: str
    hours: float
    cpu_hours: float
    gpu_hours: float
    cost: float | None


def _pool(section: dict, cpus: str, gpus: str, count: str) -> tuple[float, float]:
    actors = section.get("max_actors") or section.get(count) or 1
    return actors * float(section.get(cpus) or 0), actors * float(section.get(gpus) or 0)


def project(config: dict, metrics: dict[str, dict[str, float]], prices: dict | None = None) -> list[Projection]:
    """The reference job, stage by stage, from `metrics` (each stage's MLflow metrics, by stage name) and the pools
    of `config` (the pipeline config as logged); a stage this run did not measure is left out."""
    found = []

    def add(stage: str, work: float, what: str, rate: float | None, unit: str, cpus: float, gpus: float) -> None:
        if not rate:
            return
        hours = work / rate / 3600
        measured_on = "GPU" if metrics[stage].get("gpu_seconds", 0) > 0 else "CPU"
        found.append(Projection(stage, what, rate, unit, measured_on, hours, hours * cpus, hours * gpus,
                                price(hours * cpus, hours * gpus, prices)))

    translate, score = config.get("translate") or {}, config.get("score") or {}
    distill, index = config.get("distill") or {}, config.get("index") or {}
    if "translate" in metrics and metrics["translate"].get("translate_seconds"):
        rows = REFERENCE_JOB["passages"] + (REFERENCE_JOB["queries"] if translate.get("translate_queries", True)
                                            else 0)
        rate = metrics["translate"].get("translated_rows", 0) / metrics["translate"]["translate_seconds"]
        add("translate", rows, f"{rows:,} passages and queries", rate, "rows/s",
            *_pool(translate, "num_cpus_per_actor", "num_gpus_per_actor", "num_actors"))
    if "score" in metrics:
        cpus, gpus = _pool(score, "num_cpus_per_actor", "num_gpus_per_actor", "num_actors")
        cpus += (score.get("tokenizers") or 1) * float(score.get("num_cpus_per_tokenizer") or 0.5)
        add("score", REFERENCE_JOB["pairs"], f"{REFERENCE_JOB['pairs']:,} teacher pairs",
            metrics["score"].get("teacher_steady_pairs_per_s"), "pairs/s", cpus, gpus)
    if "distill" in metrics:
        workers = distill.get("num_workers") or 1
        gpus = workers * float(distill.get("gpus_per_worker") or 1) if distill.get("use_gpu") else 0.0
        add("distill", REFERENCE_JOB["steps"], f"{REFERENCE_JOB['steps']:,} steps at this run's batch",
            metrics["distill"].get("steps_per_s"), "steps/s", workers * float(distill.get("cpus_per_worker") or 1),
            gpus)
    if "index" in metrics:
        passages = REFERENCE_JOB["documents"] * metrics["index"].get("passages_per_doc", 1.0)
        add("index", passages, f"{REFERENCE_JOB['documents']:,} documents ({passages:,.0f} passages)",
            metrics["index"].get("encode_steady_passages_per_s"), "passages/s",
            *_pool(index, "num_cpus_per_actor", "num_gpus_per_actor", "num_actors"))
    return found
