"""What a stage used: CPU-seconds, GPU-seconds and its start-up time before the first output row.

CPU-seconds are those of this machine's processes that descend from the driver: the driver itself and, when the
driver started the Ray node (a local cluster), the node's raylet and workers. They are sampled once a second. Each
sample also reads what a process's reaped children used (the kernel adds a child's CPU time to its parent's when the
parent waits for it), so a worker that exits during the stage counts in full, even one that lived between two
samples; a child whose parent did not collect it (its parent ignored SIGCHLD) counts up to its last sample. On a
remote cluster only the driver's part is counted. GPU-seconds are the GPUs Ray had reserved for the stage's tasks
and actors, sampled likewise, times the seconds: reservation, not utilisation.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

_active: list[StageUsage] = []


def mark_first_row() -> None:
    """Note that the running stage (if any) has written its first output row; later calls change nothing."""
    if _active and _active[-1].first_row is None:
        _active[-1].first_row = time.perf_counter()


@dataclass(frozen=True)
class _Cpu:
    """One process's CPU-seconds: its own, and those of the children it has reaped (with theirs, recursively)."""

    parent: tuple[int, float] | None
    own: float
    reaped: float

    @property
    def total(self) -> float:
        return self.own + self.reaped


_NONE = _Cpu(None, 0.0, 0.0)


def _process_tree_cpu() -> dict[tuple[int, float], _Cpu]:
    """CPU-seconds of this process and each of its descendants, by (pid, creation time)."""
    import psutil

    found = {}
    key_of_pid = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:  # parents come before their children
        try:
            key = key_of_pid[process.pid] = (process.pid, process.create_time())
            times = process.cpu_times()
            found[key] = _Cpu(key_of_pid.get(process.ppid()), times.user + times.system,
                              times.children_user + times.children_system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _reserved_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0) - ray.available_resources().get("GPU", 0.0)


@dataclass
class StageUsage:
    """Measures one stage from `start()` to `stop()`; `metrics()` gives what was measured."""

    started: float = 0.0
    first_row: float | None = None
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    cpu_at_start: dict = field(default_factory=dict)
    cpu_last: dict = field(default_factory=dict)
    """Each process's CPU-seconds at its latest sample; a process that has exited keeps its last one."""
    cpu_alive: set = field(default_factory=set)
    """The processes found by the latest sample."""
    _gpus: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    def start(self) -> StageUsage:
        self.started = time.perf_counter()
        self.cpu_at_start = _process_tree_cpu()
        self.cpu_last = dict(self.cpu_at_start)
        self.cpu_alive = set(self.cpu_at_start)
        self._gpus = _cluster_has_gpus()
        self._sampler = threading.Thread(target=self._sample, name="td-ray-usage", daemon=True)
        self._sampler.start()
        _active.append(self)
        return self

    def _sample(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(1.0):
            now = time.perf_counter()
            try:
                self._sample_cpu()
                if self._gpus:
                    self.gpu_seconds += _reserved_gpus() * (now - last)
            except Exception:  # noqa: BLE001 - a cluster going away must not fail the stage it measures
                return
            last = now

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self._sample_cpu()
        self.seconds = time.perf_counter() - self.started
        if self in _active:
            _active.remove(self)

    def _sample_cpu(self) -> None:
        sample = _process_tree_cpu()
        self.cpu_last.update(sample)
        self.cpu_alive = set(sample)

    @property
    def cpu_seconds(self) -> float:
        """Own and reaped CPU-seconds of every process since the start, each exited child counted once."""
        seconds = sum(cpu.total - self.cpu_at_start.get(key, _NONE).total for key, cpu in self.cpu_last.items())
        exited_by_parent = defaultdict(list)
        for key, cpu in self.cpu_last.items():
            if key not in self.cpu_alive and cpu.parent in self.cpu_last:
                exited_by_parent[cpu.parent].append(cpu.total)
        for parent, children_seconds in exited_by_parent.items():
            reaped = self.cpu_last[parent].reaped - self.cpu_at_start.get(parent, _NONE).reaped
            if reaped >= sum(children_seconds):  # the parent collected them: their whole time is in its reaped time
                seconds -= sum(children_seconds)
        return seconds

    def metrics(self) -> dict[str, float]:
        """cpu_seconds, gpu_seconds, and startup_seconds when a first row was written."""
        found = {"cpu_seconds": self.cpu_seconds, "gpu_seconds": self.gpu_seconds}
        if self.first_row is not None:
            found["startup_seconds"] = self.first_row - self.started
        return found


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0.0) > 0
