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
def ray_head(monkeypatch):
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
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the JobSubmissionClient in this process
    temp_dir = tempfile.mkdtemp(prefix="tdray-head-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
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


def test_demo_job_succeeds_on_a_local_head_and_writes_its_outputs(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    workspace = tmp_path / "job-ws"
    submission = f"tdray-demo-{int(time.time())}"
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--submission-id", submission, "--no-wait", "--", "python", "jobs/pipeline.py", "--demo", "--workspace", str(workspace)],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    client = JobSubmissionClient(address)
    deadline = time.time() + 480
    while client.get_job_status(submission) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(submission)[-3000:]
        time.sleep(3)
    logs = client.get_job_logs(submission)
    assert client.get_job_status(submission) == JobStatus.SUCCEEDED, logs[-5000:]
    assert "joined Ray cluster" in logs  # it ran on the submitted-to cluster, not a cluster of its own
    for output in ("translate/passages.xx.parquet", "score/scores.parquet", "distill/student/config.json",
                   "index/index.faiss", "evaluate/run.trec"):
        assert (workspace / output).is_file(), output
    assert (workspace / "evaluate" / "run.trec").read_text().count("\n") > 100
