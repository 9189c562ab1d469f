"""What every benchmark shares: the machine's description, contention, process-tree sampling, goals and reports.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on ``sys.path``).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FAST_PLAID = "fast-plaid==1.7.0.2110"
"""The peer of `bench/colbert_index.py`: it needs its own torch (2.11), so it lives in a venv of its own."""
PEERS = {"pylate": (["pylate==1.6.0"], "pylate", "pylate_arm.py", None),
         "plaid-x": (["PLAID-X==0.3.3", "transformers==4.46.3"], "colbert", "plaidx_arm.py", "python3.10")}
"""The peers of `bench/pylate_check.py`, each in a venv of its own (their pins clash with td-ray's): requirements, the
module that shows the venv works, the arm script that runs there, and the interpreter when not td-ray's (PLAID-X's
config dataclasses fail to import on Python 3.11: a mutable default; its HF_ColBERT calls `init_weights`, which
transformers 5 no longer completes)."""

logger = logging.getLogger("bench.common")


def psutil():
    """psutil, imported on first use (a td-ray dependency, pinned to the version Ray bundles)."""
    import psutil as module

    return module


class ProcessTree(threading.Thread):
    """Samples a process and all its descendants every ``interval`` s: their summed CPU time, the peaks of their
    summed RSS (and PSS with ``pss``, which reads every process's smaps and costs more), the root's own peak RSS,
    and the peak RSS of the largest single descendant (a Ray worker, raylet, GCS...).

    RSS counts shared pages a process touched: memory-mapped files (the page cache) and Ray's object store
    (shared memory). The root's and the largest descendant's private memory (RSS less those shared pages) are
    kept beside, as what really grows with the data."""

    def __init__(self, pid: int, interval: float, pss: bool = False):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peak_rss = self.peak_pss = self.processes_at_peak = 0
        self.root_peak_rss = self.largest_child_rss = self.root_peak_private = self.largest_child_private = 0
        self.largest_child = ""
        self.cpu_series: list[tuple[float, float]] = []
        """(time.time(), CPU seconds of every process seen so far, each at its last sample)."""
        self._cpu_by_pid: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def sample(self) -> None:
        ps = psutil()
        try:
            root = ps.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except ps.NoSuchProcess:
            return
        rss = pss = 0
        for process in processes:
            try:
                times = process.cpu_times()
                self._cpu_by_pid[process.pid] = times.user + times.system
                memory = process.memory_full_info() if self.pss else process.memory_info()
                rss, pss = rss + memory.rss, pss + getattr(memory, "pss", 0)
                private = memory.rss - getattr(memory, "shared", 0)
                if process.pid == self.pid:
                    self.root_peak_rss = max(self.root_peak_rss, memory.rss)
                    self.root_peak_private = max(self.root_peak_private, private)
                else:
                    self.largest_child_private = max(self.largest_child_private, private)
                    if memory.rss > self.largest_child_rss:
                        self.largest_child_rss = memory.rss
                        self.largest_child = " ".join(process.cmdline()[:2])[:120]
            except (ps.NoSuchProcess, ps.AccessDenied):
                continue
        self.cpu_series.append((time.time(), sum(self._cpu_by_pid.values())))
        if rss > self.peak_rss:
            self.peak_rss, self.processes_at_peak = rss, len(processes)
        self.peak_pss = max(self.peak_pss, pss)

    def cpu_at(self, when: float) -> float:
        """Cumulative CPU seconds of the tree at ``when``, interpolated between samples."""
        series = self.cpu_series
        if when <= series[0][0]:
            return series[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(series):
            if when <= t1:
                return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1
        return series[-1][1]


def bench_cache() -> Path:
    """Where benchmarks keep what outlives a run and must stay out of the repository (peers' venvs and indexes):
    ``$TD_RAY_BENCH_CACHE``, else ``~/.cache/td-ray-bench``."""
    return Path(os.environ.get("TD_RAY_BENCH_CACHE", Path.home() / ".cache" / "td-ray-bench"))


def fast_plaid_python() -> Path:
    """The python of a venv with fast-plaid (`peer_python`; about 70 s and 4.8 GB the first time: PyPI's CUDA build
    of torch 2.11, which also runs on CPU)."""
    return peer_python([FAST_PLAID], "fast_plaid")


def peer_python(requirements: list[str], module: str, interpreter: str | None = None) -> Path:
    """The python of a venv under `bench_cache()` holding `requirements` (a peer whose pins clash with td-ray's), made
    with `interpreter` (a name on PATH; default this one), created on first use and reused while ``import module``
    works there."""
    base = shutil.which(interpreter) if interpreter else sys.executable
    if base is None or subprocess.run([base, "-c", ""], capture_output=True, check=False).returncode:
        raise RuntimeError(f"{' '.join(requirements)} needs {interpreter} on PATH to make its venv (with pyenv: "
                           f"PATH=$(pyenv prefix 3.10.13)/bin:$PATH); install it first")
    venv = bench_cache() / "-".join([*(requirement.replace("==", "-") for requirement in requirements),
                                     *([interpreter] if interpreter else [])])
    python = venv / "bin" / "python"
    works = python.exists() and subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                                               check=False).returncode == 0
    if works:
        logger.info("%s: reusing %s", module, venv)
        return python
    logger.info("%s: creating %s and installing %s", module, venv, " ".join(requirements))
    started = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                   check=True)
    logger.info("%s: installed in %.0f s", module, time.perf_counter() - started)
    return python


def peer_arm(doc: str, encode) -> None:
    """The main of a peer's arm (`pylate_arm.py`, `plaidx_arm.py`), run in the peer's venv with the standard library
    and numpy only: reads ``--model DIR --texts TEXTS.json --out OUT.npz``; ``encode(model, queries, documents)``
    returns each text's token vectors and the settings the peer read; writes them to OUT.npz (`query_<i>`,
    `document_<i>`, and `settings` as a JSON string)."""
    import argparse

    import numpy as np

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name in ("--model", "--texts", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    queries, documents, settings = encode(args.model, texts["queries"], texts["documents"])
    arrays = {f"query_{i}": np.asarray(vectors, np.float32) for i, vectors in enumerate(queries)}
    arrays |= {f"document_{i}": np.asarray(vectors, np.float32) for i, vectors in enumerate(documents)}
    np.savez(args.out, settings=json.dumps(settings, default=str), **arrays)


def contention() -> dict:
    """How busy the machine is: 1-minute load average and CPU pressure (share of time tasks waited for a CPU)."""
    pressure = Path("/proc/pressure/cpu")
    some = pressure.read_text().split("\n")[0].split() if pressure.exists() else []
    averages = dict(field.split("=") for field in some[1:] if field.startswith("avg"))
    return {"load_average_1m": os.getloadavg()[0],
            "cpu_pressure_avg60": float(averages["avg60"]) / 100 if "avg60" in averages else None}


def machine_info() -> dict:
    """The machine, the engines' versions and the commit measured, with the contention at the start."""
    import ctranslate2
    import faiss
    import pyarrow
    import ray
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "ctranslate2": ctranslate2.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "faiss": faiss.__version__,
            "pyarrow": pyarrow.__version__, "git_commit": git("rev-parse", "--short", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "contention_at_start": contention()}


def meets(goals: dict[str, tuple[str, float]], name: str, value: float | None) -> str:
    """"yes" or "NO" against the goal `goals[name]` (an operator and a bound); "" without a goal or a value."""
    if name not in goals or value is None:
        return ""
    op, goal = goals[name]
    return "yes" if (value >= goal if op == ">=" else value <= goal) else "NO"


def write_report(report: dict, path: Path) -> None:
    """Write the JSON report atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def search_against_bare(build: Path, files: list[str], params: str | None, dim: int, queries, k: int) -> dict:
    """Search `queries` with td-ray's `Searcher` over an index's files, then with bare FAISS on the same index (one
    file: `index.search`; shards: FAISS's own IndexShards, all in memory), each warmed first. Returns both times and
    td-ray's ids."""
    import faiss

    from td_ray.retrieval.faiss_index import Searcher, _in_folder

    searcher = Searcher([build / name for name in files], params)
    searcher.search(queries[:10], k)  # warm the mapped pages
    started = time.perf_counter()
    _, ids = searcher.search(queries, k)
    ours = time.perf_counter() - started
    with _in_folder(build):  # an on-disk IVF index names its lists file relative to its folder
        if len(files) == 1:
            index = faiss.read_index(files[0], faiss.IO_FLAG_READ_ONLY)
        else:
            index = faiss.IndexShards(dim, True, False)
            shards = [faiss.read_index(name) for name in files]
            for shard in shards:
                index.add_shard(shard)
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
    index.search(queries[:10], k)
    started = time.perf_counter()
    index.search(queries, k)
    bare = time.perf_counter() - started
    return {"seconds": ours, "bare_seconds": bare, "ids": ids}
