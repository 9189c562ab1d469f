"""The demo submitted with `ray job submit` to a real local head started with `ray start --head`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head():
    """A head node on 127.0.0.1 with free ports, stopped (with its processes) when the test ends.

    The test session's own in-process cluster is shut down first: two clusters on one 2-core machine starve
    each other, and later tests start a fresh one on demand.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port, dashboard = _free_port(), _free_port()
    # Token auth on (Ray's secure default): the head writes ~/.ray/auth_token and the CLI reads it.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    temp_dir = tempfile.mkdtemp(prefix="tdray-head-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={_free_port()}",  # not the default 52365, which another cluster may hold
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                break
        except OSError:
            time.sleep(1)
    else:
        head.terminate()
        pytest.fail("the Ray head did not open its dashboard port within 90 s")
    yield address, env
    os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops the node's processes on SIGINT
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def _ray_job(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The `ray job` CLI, in a process that reads RAY_AUTH_MODE from `env` at start (as a user's shell would)."""
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def test_demo_job_succeeds_on_a_local_head_and_writes_its_outputs(ray_head, tmp_path):
    address, env = ray_head
    workspace = tmp_path / "job-ws"
    submission = f"tdray-demo-{int(time.time())}"
    deadline = time.time() + 120
    while True:  # the head's job agent starts a little after its dashboard port opens
        submitted = _ray_job(env, "submit", "--address", address, "--working-dir", str(REPO), "--submission-id",
                             submission, "--no-wait", "--", "python", "jobs/pipeline.py", "--demo", "--workspace",
                             str(workspace))
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.time() + 480
    while True:
        checked = _ray_job(env, "status", "--address", address, submission)
        status = checked.stdout + checked.stderr  # the CLI logs the status line to stderr
        final = [word for word in ("succeeded", "failed", "stopped") if f"job '{submission}' {word}" in status.lower()]
        if final:
            break
        assert time.time() < deadline, _ray_job(env, "logs", "--address", address, submission).stdout[-3000:]
        time.sleep(3)
    logs = _ray_job(env, "logs", "--address", address, submission).stdout
    assert final == ["succeeded"], logs[-5000:]
    assert "joined Ray cluster" in logs  # it ran on the submitted-to cluster, not a cluster of its own
    for output in ("translate/passages.qaa.parquet", "score/scores.parquet", "distill/student/config.json",
                   "index/index.faiss", "evaluate/run.trec"):
        assert (workspace / output).is_file(), output
    assert (workspace / "evaluate" / "run.trec").read_text().count("\n") > 100
