"""Devices and threads: `auto` is only a GPU the Ray worker reserved, threads are the CPUs it reserved, and bf16
autocast (GPU only) keeps what the encoders and the teacher rank."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from td_ray import devices
from td_ray.encoders.colbert import ColBERTSpec, ColBERTStudentEncoder, load_colbert
from td_ray.encoders.dense import StudentEncoder
from td_ray.retrieval import faiss_index
from td_ray.retrieval.faiss_index import IndexSettingsError
from td_ray.score.core import CrossEncoderTeacher
from td_ray.translate.actor import translator_device


def _probe_class() -> type:
    """A class reporting what its process picks when torch, FAISS and CTranslate2 each see one GPU (patched), so that
    only a reservation can say no: devices for `auto`, and threads. Defined in a function, so Ray ships it by value
    to workers, which cannot import the tests."""

    class Probe:
        def choices(self, student: str | None = None) -> dict:
            import os
            from unittest import mock

            import ctranslate2
            import faiss
            import torch

            from td_ray import devices
            from td_ray.encoders.dense import StudentEncoder
            from td_ray.retrieval import faiss_index
            from td_ray.translate.actor import translator_device

            with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                    mock.patch.object(faiss, "get_num_gpus", return_value=1, create=True), \
                    mock.patch.object(ctranslate2, "get_cuda_device_count", return_value=1):
                torch.set_num_threads(7)  # anything but the reservation, so the reservation must set it back
                faiss.omp_set_num_threads(7)
                choices = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "reserved_gpus": devices.reserved_gpus(),
                           "torch": devices.resolve_device("auto"), "faiss_on_gpu": faiss_index.on_gpu("auto"),
                           "ctranslate2": translator_device("auto"), "thread_count": devices.thread_count()}
                if student:
                    choices["encoder"] = StudentEncoder(student).device
                else:
                    devices.use_reserved_threads()
            return {**choices, "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                    "tokenizer_threads": int(os.environ.get("RAYON_NUM_THREADS", "0"))}

    return Probe


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_ray_actor_without_a_gpu_stays_on_the_cpu_and_computes_on_its_reserved_cpus(ray_cluster, assets_root,
                                                                                      cpus):
    """A zero-GPU actor on a node whose GPU 0 it can see (CUDA_VISIBLE_DEVICES=0, and every library patched to see
    one GPU) resolves `auto` to the CPU for torch, FAISS and CTranslate2, and runs torch and FAISS on as many threads
    as it reserved CPUs."""
    import ray

    probe = ray.remote(_probe_class()).options(
        num_cpus=cpus, num_gpus=0, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}).remote()
    try:
        seen = ray.get(probe.choices.remote(), timeout=180)
        with_encoder = ray.get(probe.choices.remote(str(assets_root / "tiny-models" / "student")), timeout=180)
    finally:
        ray.kill(probe)
    assert seen["visible"] == "0" and seen["reserved_gpus"] == 0  # Ray left the GPU visible, reserved none
    assert (seen["torch"], seen["faiss_on_gpu"], seen["ctranslate2"]) == ("cpu", False, "cpu")
    assert seen["thread_count"] == seen["torch_threads"] == seen["faiss_threads"] == seen["tokenizer_threads"] == cpus
    assert with_encoder["encoder"] == "cpu" and with_encoder["torch_threads"] == with_encoder["faiss_threads"] == cpus


def test_outside_ray_auto_takes_a_visible_gpu():
    """The same patches in a plain process (the driver) pick the GPU: the actor's CPU is the reservation's doing."""
    before = torch.get_num_threads()
    try:
        seen = _probe_class()().choices()
    finally:
        torch.set_num_threads(before)
    assert seen["reserved_gpus"] is None
    assert (seen["torch"], seen["faiss_on_gpu"], seen["ctranslate2"]) == ("cuda", True, "cuda")


@pytest.mark.parametrize(("reserved", "expected"), [(None, "cuda"), (0, "cpu"), (1, "cuda")])
def test_auto_is_the_reserved_gpu(monkeypatch, reserved, expected):
    monkeypatch.setattr(devices, "reserved_gpus", lambda: reserved)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == devices.resolve_device(None) == expected
    assert devices.resolve_device("cpu") == "cpu"


def test_cuda_without_a_reserved_or_visible_gpu_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "reserved_gpus", lambda: 0)
    with pytest.raises(ValueError, match="reserved no GPU.*num_gpus_per_actor"):
        devices.resolve_device("cuda")
    monkeypatch.setattr("faiss.get_num_gpus", lambda: 1, raising=False)
    with pytest.raises(IndexSettingsError, match="reserved no GPU.*index.num_gpus_per_actor"):
        faiss_index.on_gpu("cuda")
    monkeypatch.setattr(devices, "reserved_gpus", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU is visible"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="must be auto, cpu or cuda"):
        devices.resolve_device("mps")


def test_outside_ray_threads_are_left_alone_unless_a_default_is_given():
    import faiss

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert devices.use_reserved_threads() == 3 and torch.get_num_threads() == 3
        assert devices.use_reserved_threads(default=1) == 1
        assert torch.get_num_threads() == faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_autocast_is_bf16_on_a_gpu_and_nothing_on_the_cpu():
    with warnings.catch_warnings():  # without CUDA torch warns that this autocast is disabled
        warnings.simplefilter("ignore")
        on_gpu = devices.autocast("cuda")
    assert isinstance(on_gpu, torch.autocast) and on_gpu.fast_dtype == torch.bfloat16 and on_gpu.device == "cuda"
    with devices.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ bf16 autocast
def _bf16_everywhere(monkeypatch):
    """Make `devices.autocast` give CPU bf16 autocast, as it gives CUDA bf16 autocast on a GPU."""
    monkeypatch.setattr(devices, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))


def _texts(assets_root, name: str, count: int) -> list[str]:
    lines = (assets_root / "demo" / name).read_text(encoding="utf-8").splitlines()[:count]
    return [line.split("\t", 1)[1] for line in lines]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _overlap_at_10(scores: np.ndarray, other: np.ndarray) -> float:
    top, other_top = np.argsort(-scores, axis=1)[:, :10], np.argsort(-other, axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, other_top)]))


def test_dense_student_under_bf16_keeps_its_vectors_and_top_10(assets_root, monkeypatch):
    """The tiny student encodes 300 demo passages and 60 training queries in fp32, then under bf16 autocast (what a
    GPU runs). Tolerance: every vector's cosine to its fp32 one is at least 0.99, and each query's top 10 passages
    by dot product keep at least 80 % of the fp32 top 10 on average. The vectors do differ (bf16 did run), and come
    back as float32."""
    encoder = StudentEncoder(str(assets_root / "tiny-models" / "student"), max_length=180)
    passages, queries = _texts(assets_root, "passages.tsv", 300), _texts(assets_root, "train_queries.tsv", 60)
    fp32 = encoder.encode(passages), encoder.encode(queries)
    _bf16_everywhere(monkeypatch)
    bf16 = encoder.encode(passages), encoder.encode(queries)
    assert bf16[0].dtype == bf16[1].dtype == np.float32
    assert not np.array_equal(fp32[0], bf16[0])
    assert _cosines(fp32[0], bf16[0]).min() >= 0.99 and _cosines(fp32[1], bf16[1]).min() >= 0.99
    assert _overlap_at_10(fp32[1] @ fp32[0].T, bf16[1] @ bf16[0].T) >= 0.8


def test_colbert_student_under_bf16_keeps_its_token_vectors(assets_root, monkeypatch, tmp_path):
    """A ColBERT projection of the tiny student, fp32 against bf16 autocast. Tolerance: each token vector's cosine
    to its fp32 one is at least 0.99, and documents keep the same tokens."""
    torch.manual_seed(0)
    model, tokenizer = load_colbert(assets_root / "tiny-models" / "student", ColBERTSpec(dim=32, doc_maxlen=64))
    model.save_pretrained(tmp_path / "colbert", tokenizer)
    encoder = ColBERTStudentEncoder(tmp_path / "colbert")
    passages, queries = _texts(assets_root, "passages.tsv", 40), _texts(assets_root, "train_queries.tsv", 10)
    documents, query_vectors = encoder.encode_documents(passages), encoder.encode_queries(queries)
    _bf16_everywhere(monkeypatch)
    bf16_documents, bf16_queries = encoder.encode_documents(passages), encoder.encode_queries(queries)
    assert bf16_queries.dtype == np.float32 and not np.array_equal(bf16_queries, query_vectors)
    assert _cosines(query_vectors, bf16_queries).min() >= 0.99
    assert [len(d) for d in bf16_documents] == [len(d) for d in documents]
    assert min(_cosines(a, b).min() for a, b in zip(documents, bf16_documents)) >= 0.99


def test_cross_encoder_teacher_under_bf16_keeps_its_ranking(assets_root, monkeypatch):
    """The tiny cross-encoder teacher scores 20 training queries' 10 demo candidates each, fp32 against bf16
    autocast. Tolerance: each query's top 3 candidates keep at least 2 of the fp32 top 3 on average, and the scores
    correlate at 0.99 or more."""
    teacher = CrossEncoderTeacher(str(assets_root / "tiny-models" / "cross_encoder"), max_length=128)
    queries, passages = (dict(line.split("\t", 1) for line in (assets_root / "demo" / name).read_text().splitlines())
                         for name in ("train_queries.tsv", "passages.tsv"))
    groups: dict[str, list[str]] = {}
    for line in (assets_root / "demo" / "candidates.trec").read_text().splitlines():  # qid Q0 pid rank score tag
        qid, _, pid, *_ = line.split()
        groups.setdefault(qid, []).append(pid)
    groups = {qid: pids for qid, pids in list(groups.items())[:20]}
    pairs = [(queries[qid], passages[pid]) for qid, pids in groups.items() for pid in pids]
    fp32 = teacher.score([q for q, _ in pairs], [p for _, p in pairs]).reshape(len(groups), -1)
    _bf16_everywhere(monkeypatch)
    bf16 = teacher.score([q for q, _ in pairs], [p for _, p in pairs]).reshape(len(groups), -1)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    assert np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1] >= 0.99
    top, bf16_top = np.argsort(-fp32, axis=1)[:, :3], np.argsort(-bf16, axis=1)[:, :3]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(top, bf16_top)]) >= 2


def test_translator_device_auto_is_cuda_only_with_a_gpu_this_process_may_use(monkeypatch):
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    monkeypatch.setattr(devices, "reserved_gpus", lambda: 0)
    assert translator_device("auto") == "cpu" and translator_device("cuda") == "cuda"
    monkeypatch.setattr(devices, "reserved_gpus", lambda: 1)
    assert translator_device("auto") == "cuda"
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    assert translator_device("auto") == "cpu"


def test_task_cpus_is_a_positive_index_setting_outside_the_build_key(tmp_path):
    from td_ray.config import ConfigError, parse_config
    from td_ray.pipeline import demo_config
    from td_ray.retrieval.layout import POOL_SETTINGS

    raw = demo_config(str(tmp_path)).model_dump(mode="json")
    assert raw["index"]["task_cpus"] == 1 and "task_cpus" in POOL_SETTINGS  # threads never change what is built
    raw["index"]["task_cpus"] = 0
    with pytest.raises(ConfigError, match="index.task_cpus"):
        parse_config(json.loads(json.dumps(raw)))
