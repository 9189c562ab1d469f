"""Nothing left behind: a small watcher process that a driver starting its own local Ray cluster leaves beside it.

It records the driver's process tree (the cluster's GCS, raylet, agents and workers) once a second; when the driver
is gone, however it ended (a SIGKILL included), it ends every recorded process still running. Ray's own clean-up
misses the dashboard and runtime-env agents of a killed driver, and its actors run on for seconds. psutil compares
each process's start time, so a reused pid is never killed.

Run as ``python -m td_ray.reaper <driver pid>``; `start` does that in a session of its own, so a Ctrl-C to the
driver's terminal does not reach it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 1.0


def start() -> subprocess.Popen:
    """Start the watcher of this process's tree."""
    return subprocess.Popen([sys.executable, "-m", "td_ray.reaper", str(os.getpid())], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(pid: int, poll: float = POLL_SECONDS) -> int:
    """Record `pid`'s descendants until it ends, then end those still running; returns how many were ended."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            known.update((child.pid, child) for child in driver.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        time.sleep(poll)
    left = [process for process in known.values() if process.is_running()]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
