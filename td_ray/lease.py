"""One run per stage and workspace: a lease file, written through the workspace's filesystem (so it also works on an
object store), names the run that holds the stage: its host, pid and the start of that process, and a heartbeat.

A second run of the same stage on the same workspace stops at once with an error naming the holder. A lease is
stale, and taken over, when its holder is on this host and that process is gone (checked at once, pid reuse
included), or when it is on another host and has not beaten for `STALE_AFTER` seconds. The same test tells the
stage's actors that their driver is gone, so they stop committing (`check_holder`), and tells start-up cleanup
which temporary files may still have a live writer (`live_holders`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from td_ray.errors import DriverGoneError, WorkspaceBusyError

logger = logging.getLogger(__name__)

FOLDER = ".td_ray/leases"
HEARTBEAT_EVERY = 5.0
"""Seconds between heartbeats."""
STALE_AFTER = 60.0
"""Seconds without a heartbeat after which a lease held on another host is stale."""


@dataclass(frozen=True)
class Holder:
    """Who holds a stage's lease."""

    host: str
    pid: int
    process_start: str
    """The holder process's start time (/proc), so a reused pid is not taken for it."""
    token: str
    since: float
    heartbeat: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (f"pid {self.pid} on host {self.host}, started {started}, "
                f"last heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago")


def lease_path(stage: str) -> str:
    return f"{FOLDER}/{stage}.json"


def process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc), or "" when there is no such process.

    >>> process_start(os.getpid()) != "" and process_start(2**22 + 1) == ""
    True
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(holder: Holder) -> bool:
    """Whether the lease's holder still runs: by its process on this host, by its heartbeat elsewhere."""
    if holder.host == socket.gethostname():
        return process_start(holder.pid) == holder.process_start != ""
    return time.time() - holder.heartbeat < STALE_AFTER


def read_holder(workspace, stage: str) -> Holder | None:
    """The holder recorded in the stage's lease file; None when there is none (or it cannot be read: stale)."""
    try:
        return Holder(**json.loads(workspace.read_text(lease_path(stage))))
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def live_holders(workspace) -> list[Holder]:
    """The holders of every live lease on the workspace (any stage)."""
    if not workspace.exists(FOLDER):
        return []
    names = [info.base_name.removesuffix(".json") for info in
             workspace.fs.get_file_info(pafs.FileSelector(workspace.path(FOLDER)))
             if info.base_name.endswith(".json")]
    return [holder for holder in (read_holder(workspace, name) for name in names) if holder and alive(holder)]


def check_holder(workspace, stage: str, token: str | None = None) -> None:
    """Raise DriverGoneError unless the run a worker works for still holds the stage's lease: an actor calls this
    before each commit, so a killed driver's actors stop writing, and so do those of a run whose lease another run
    took over. `token`: the lease the worker was started under; without one (a stage run outside the runner) only a
    holder that is gone stops it."""
    holder = read_holder(workspace, stage)
    if token is not None and (holder is None or holder.token != token):
        raise DriverGoneError(f"{stage}: the run that started this work no longer holds the stage's lease ("
                              f"{'now held by ' + holder.describe() if holder else 'released'}); this worker stops "
                              "without committing")
    if holder is not None and not alive(holder):
        raise DriverGoneError(f"{stage}: the run that started this work ({holder.describe()}) is gone; this worker "
                              "stops without committing, and the next run resumes from what was committed")


class StageLease:
    """The lease of one stage on one workspace, held while the stage runs (a context manager)."""

    def __init__(self, workspace, stage: str):
        self.workspace, self.stage = workspace, stage
        self.relative = lease_path(stage)
        self.holder = Holder(socket.gethostname(), os.getpid(), process_start(os.getpid()), uuid.uuid4().hex,
                             time.time(), time.time())
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def __enter__(self) -> StageLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        current = read_holder(self.workspace, self.stage)
        if current is not None and current.token != self.holder.token:
            if alive(current):
                raise self._busy(current)
            logger.warning("%s: taking over the lease of a run that is gone (%s)", self.stage, current.describe())
        if self.workspace.is_local:
            if current is not None:  # stale: removed, then created exclusively like a fresh lease
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.workspace.path(self.relative))
            self._create_exclusive()
        else:  # an object store has no exclusive create: the last writer wins, and the others see it on reading back
            self._write()
            time.sleep(0.5)
            winner = read_holder(self.workspace, self.stage)
            if winner is not None and winner.token != self.holder.token:
                raise self._busy(winner)
        self._beating = threading.Thread(target=self._beat, name=f"td-ray-lease-{self.stage}", daemon=True)
        self._beating.start()

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        current = read_holder(self.workspace, self.stage)
        if current is not None and current.token == self.holder.token:
            self.workspace.fs.delete_file(self.workspace.path(self.relative))

    def _create_exclusive(self) -> None:
        path = self.workspace.path(self.relative)
        try:
            with self.workspace.storage(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            winner = read_holder(self.workspace, self.stage)
            if winner is None:  # written this instant: the other run is starting
                time.sleep(0.1)
                winner = read_holder(self.workspace, self.stage)
            raise self._busy(winner) from None
        try:
            with self.workspace.storage(path), os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(json.dumps(asdict(self.holder)))
        except BaseException:
            os.remove(path)
            raise

    def _write(self) -> None:
        self.workspace.write_text(self.relative, json.dumps(asdict(self.holder)))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            current = read_holder(self.workspace, self.stage)
            if current is None or current.token != self.holder.token:
                logger.error("%s: this run's lease on %s was taken over (%s); its actors stop committing",
                             self.stage, self.workspace.location(self.relative),
                             current.describe() if current else "deleted")
                return
            self.holder = Holder(**(asdict(self.holder) | {"heartbeat": time.time()}))
            try:
                self._write()
            except OSError as error:  # a full disk: the lease stays, older; the stage's own writes report it
                logger.warning("%s: could not renew the lease: %s", self.stage, error)

    def _busy(self, holder: Holder | None) -> WorkspaceBusyError:
        who = holder.describe() if holder else "a run that is starting"
        return WorkspaceBusyError(
            f"the {self.stage} stage of workspace {self.workspace.location('')} is being run by another td-ray run "
            f"({who}). Wait for it to finish, or run in another workspace. If that run is gone (a host that will not "
            f"come back), delete {self.workspace.location(self.relative)}; a lease from another host also lapses "
            f"{STALE_AFTER:.0f} s after its last heartbeat")
