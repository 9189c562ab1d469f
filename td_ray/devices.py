"""The devices and threads a process may use: what its Ray task or actor reserved, and nothing more.

Ray sets ``CUDA_VISIBLE_DEVICES`` only for workers that reserved GPUs; a worker that reserved none still sees every
GPU of its node (Ray 2.60), so "a GPU is visible" never means "this worker may use it". Inside a Ray worker the
reservation decides; a plain process (the driver, a script, a test) uses what it sees.
"""
from __future__ import annotations

import math
import os


def _ray_worker_context():
    """The runtime context when this process is a Ray task or actor, else None (the driver, a script)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return context if context.worker.mode == ray.WORKER_MODE else None


def reserved_gpus() -> int | None:
    """GPUs this Ray worker reserved (0 when none), or None outside a Ray worker."""
    context = _ray_worker_context()
    if context is None:
        return None
    return len(context.get_accelerator_ids().get("GPU", []))


def reserved_cpus() -> float | None:
    """CPUs this Ray worker reserved, or None outside a Ray worker."""
    context = _ray_worker_context()
    if context is None:
        return None
    return float(context.get_assigned_resources().get("CPU", 0.0))


def gpus_allowed() -> bool:
    """Whether this process may use the GPUs it sees: outside Ray, yes; in a Ray worker, only if it reserved one
    (Ray then makes exactly the reserved GPUs visible)."""
    gpus = reserved_gpus()
    return gpus is None or gpus > 0


def resolve_device(device: str | None = "auto") -> str:
    """The torch device to run on: ``cpu``, ``cuda``, or for ``auto`` (and None) the GPU this Ray worker reserved,
    else cpu. Outside Ray, ``auto`` takes a visible GPU. ``cuda`` where none is reserved or visible is an error."""
    import torch

    device = device or "auto"
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    allowed = gpus_allowed()
    usable = allowed and torch.cuda.is_available()
    if device == "auto":
        return "cuda" if usable else "cpu"
    if not usable:
        where = ("no GPU is visible" if allowed
                 else "this Ray worker reserved no GPU (set the stage's num_gpus_per_actor)")
        raise ValueError(f"device {device!r} was asked for but {where}; use device: auto or cpu")
    return device


def thread_count(default: int | None = None) -> int:
    """Threads this process should compute with: the whole CPUs its Ray worker reserved (at least 1); outside Ray,
    `default`, else every core."""
    cpus = reserved_cpus()
    if cpus is not None:
        return max(1, math.floor(cpus))
    return max(1, default or os.cpu_count() or 1)


def use_reserved_threads(default: int | None = None) -> int:
    """Set torch's and FAISS's thread pools, and the Rust pool of HF's fast tokenizers (RAYON_NUM_THREADS, read when
    the process first tokenizes a batch), to `thread_count`; returns it. Outside Ray and without `default` the pools
    are left as the process set them (torch's physical cores, OMP_NUM_THREADS, a script's own choice)."""
    import faiss
    import torch

    if default is None and reserved_cpus() is None:
        return torch.get_num_threads()
    threads = thread_count(default)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # else a tokenizer batch runs on every core of the node
    return threads


def autocast(device: str):
    """bf16 autocast on a GPU (8-15x fp32's speed on an H100's tensor cores); on the CPU a no-op, so CPU results
    stay fp32."""
    import contextlib

    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
