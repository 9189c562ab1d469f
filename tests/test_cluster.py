"""A cluster whose nodes share no disk, as on a cloud: a Ray head that runs nothing (`--num-cpus=0`) and a worker node in
its own mount namespace, where an empty tmpfs hides every file this test and the head write; an S3 server (SeaweedFS)
holds the workspace and an MLflow server (`--serve-artifacts`) the runs. The demo is submitted with `ray job submit`:

- on a local workspace, which the worker does not see: refused at start, naming the fix;
- on `s3://`: killed in the middle of distill, submitted again (it resumes from its checkpoint and ends with the
  single-node run's metrics), submitted a third time (every stage unchanged), then with one passage edited (translate
  translates that one row again).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import start_session_ray
from processes import (
    BIN,
    S3_CREDENTIALS,
    free_port,
    job_state,
    start,
    start_s3,
    stop,
    submit,
    wait_for_job,
    wait_for_port,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="a node without the head's disk needs root and unshare(1)")]

BUCKET = "tdray"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pipeline_run):
    """S3, MLflow and the two Ray nodes; yields what a job submission needs. The session's pipeline runs first, and
    the session's own Ray cluster is stopped meanwhile (on 2 cores it would starve these), then started again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    base = tmp_path_factory.mktemp("nodes")  # everything under it is hidden from the worker node
    os.environ["TD_RAY_CACHE"] = str(base / "cache-head")  # the driver's cache: where the demo's assets are
    logs = base / "logs"
    logs.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MLFLOW_", "AWS_", "RAY_"))}
    env |= S3_CREDENTIALS | {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                             "MLFLOW_DISABLE_TELEMETRY": "true"}
    processes = []
    try:
        s3, endpoint = start_s3(base / "s3", BUCKET, env, logs / "s3.log")
        processes.append(s3)
        env["AWS_ENDPOINT_URL_S3"] = f"http://{endpoint}"
        mlflow_port = free_port()
        processes.append(start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--serve-artifacts",
                                "--artifacts-destination", str(base / "mlflow-artifacts"), "--workers", "1"],
                               env, logs / "mlflow.log"))
        wait_for_port(mlflow_port, processes[-1], "the MLflow server", seconds=120)
        gcs, dashboard = free_port(), free_port()
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={base / 'ray'}"]
        processes.append(start([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=0",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                                f"--dashboard-agent-listen-port={free_port()}", *common],
                               env | {"TD_RAY_CACHE": str(base / "cache-head")}, logs / "head.log"))
        wait_for_port(dashboard, processes[-1], "the Ray head")
        # The worker: a private mount namespace with an empty tmpfs over `base` (the head's files, its Ray temp dir).
        worker = (f'mount -t tmpfs -o size=4g tdray-worker "{base}" && exec "{BIN / "ray"}" start '
                  f'--address=127.0.0.1:{gcs} --num-cpus=2 --dashboard-agent-listen-port={free_port()} '
                  f'--metrics-export-port={free_port()} {" ".join(common)}')
        processes.append(start(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", worker],
                               env | {"TD_RAY_CACHE": str(base / "cache-worker")}, logs / "worker-start.log"))
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_nodes(address, env, 2)
        yield {"address": address, "env": env, "base": base, "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "s3": endpoint}
    finally:
        for process in reversed(processes):
            stop(process)
        os.environ.pop("TD_RAY_CACHE")
        start_session_ray()


def _wait_for_nodes(address: str, env: dict, count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        listed = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", address, "--format", "json"],
                                env=env, capture_output=True, text=True, check=False)
        nodes = json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []  # or "No resource..."
        if sum(node["state"] == "ALIVE" for node in nodes) >= count:
            return
        time.sleep(2)
    pytest.fail(f"the cluster did not reach {count} alive nodes: {listed.stdout[-500:]} {listed.stderr[-500:]}")


def _s3(cluster) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], endpoint_override=cluster["s3"],
                             scheme="http", region="us-east-1")


def _runtime_env(cluster) -> str:
    """What every task, actor and training worker of the job gets: the tracking server."""
    return json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow"]}})


def _write_config(cluster, workspace: str, name: str, **sections) -> Path:
    """The demo config on `workspace` with `sections` updated, as a YAML file on the head's disk."""
    from td_ray.pipeline import demo_config

    raw = demo_config(workspace).model_dump(mode="json")
    for section, values in sections.items():
        raw[section] |= values
    path = cluster["base"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _run(cluster, name: str, arguments: list[str]) -> tuple[str, str]:
    submission = f"{name}-{int(time.time())}"
    submit(cluster["address"], cluster["env"], submission, ["python", "jobs/pipeline.py", *arguments],
           _runtime_env(cluster))
    return wait_for_job(cluster["address"], cluster["env"], submission)


def _stage_runs(uri: str, experiment: str = "td-ray") -> list[dict[str, object]]:
    """Every stage run of the experiment on the tracking server, oldest first: name, status and metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.td_ray.stage != ''", max_results=500) if found else []
    return [{"stage": run.data.tags["td_ray.stage"], "name": run.info.run_name, "status": run.info.status,
             "metrics": run.data.metrics, "id": run.info.run_id}
            for run in sorted(runs, key=lambda run: run.info.start_time)]


def test_a_local_workspace_the_worker_node_does_not_see_is_refused_naming_the_fix(cluster):
    state, logs = _run(cluster, "local", ["--demo", "--workspace", str(cluster["base"] / "local-workspace")])
    assert state == "failed", logs[-3000:]
    assert "nodes do not see" in logs and "s3://bucket/prefix" in logs, logs[-3000:]


@pytest.fixture(scope="module")
def s3_demo(cluster, pipeline_run):
    """The demo on s3://: killed mid-distill once a checkpoint is stored, then submitted again until it ends."""
    workspace = f"s3://{BUCKET}/demo"
    config = _write_config(cluster, workspace, "s3-demo", distill={"checkpoint_every": 20})
    submission = f"killed-{int(time.time())}"
    submit(cluster["address"], cluster["env"], submission, ["python", "jobs/pipeline.py", "--config", str(config)],
           _runtime_env(cluster))
    s3, deadline = _s3(cluster), time.time() + 600
    while not _checkpoints(s3) and time.time() < deadline and job_state(cluster["address"], cluster["env"],
                                                                          submission) is None:
        time.sleep(0.5)
    stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster["address"], submission],
                             env=cluster["env"], capture_output=True, text=True, check=False)
    killed, killed_logs = wait_for_job(cluster["address"], cluster["env"], submission)
    assert killed == "stopped", (stopped.stdout, stopped.stderr, killed_logs[-3000:])
    state, logs = _run(cluster, "resumed", ["--config", str(config)])
    assert state == "succeeded", logs[-5000:]
    return config, logs, pipeline_run


def _checkpoints(s3: pafs.S3FileSystem) -> list[str]:
    if s3.get_file_info(f"{BUCKET}/demo/ray_train").type == pafs.FileType.NotFound:
        return []
    return [info.path for info in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/demo/ray_train", recursive=True))
            if info.base_name.startswith("checkpoint_") and info.type == pafs.FileType.Directory]


def test_the_killed_demo_resumes_from_its_checkpoint_and_ends_with_the_single_node_metrics(cluster, s3_demo):
    _, logs, (_, single_node) = s3_demo
    runs = _stage_runs(cluster["mlflow"])
    distills = [run for run in runs if run["stage"] == "distill"]
    assert distills[0]["status"] == "FAILED"  # left RUNNING by the killed job, ended by the next one
    assert distills[-1]["status"] == "FINISHED" and distills[-1]["metrics"]["start_step"] >= 20
    from mlflow import MlflowClient

    history = MlflowClient(cluster["mlflow"]).get_metric_history(distills[-1]["id"], "loss")
    assert max(metric.step for metric in history) == 100  # logged by the training worker, on the other node
    evaluated = [run for run in runs if run["name"] == "evaluate"][-1]["metrics"]  # not "evaluate (untrained)"
    for measure in ("nDCG_20", "R_100"):
        assert evaluated[measure] == pytest.approx(single_node["evaluate"].metrics[measure.replace("_", "@")], abs=0.05)
    s3 = _s3(cluster)
    names = {info.path.split(f"{BUCKET}/demo/", 1)[1]
             for info in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/demo", recursive=True))}
    assert {"score/scores.parquet", "evaluate/run.trec", "stages/evaluate.json", "index/index_meta.json",
            "report/report.html"} <= names
    assert "distill/student/config.json" in names


def test_a_rerun_finds_every_stage_unchanged(cluster, s3_demo):
    config, _, _ = s3_demo
    before = len(_stage_runs(cluster["mlflow"]))
    state, logs = _run(cluster, "rerun", ["--config", str(config), "--stages", "translate,score,distill,index,evaluate"])
    assert state == "succeeded", logs[-5000:]
    rerun = _stage_runs(cluster["mlflow"])[before:]
    assert {run["stage"] for run in rerun} == {"translate", "score", "distill", "index", "evaluate"}
    assert all(run["metrics"].get("unchanged") == 1.0 for run in rerun), rerun


def test_an_edited_passage_is_translated_again_alone(cluster, s3_demo):
    from td_ray.pipeline import demo_assets_root

    config, _, _ = s3_demo
    passages = demo_assets_root(f"s3://{BUCKET}/demo") / "demo" / "passages.tsv"
    lines = passages.read_text(encoding="utf-8").splitlines()
    pid, text = lines[5].split("\t", 1)
    lines[5] = f"{pid}\tmirek {text}"
    passages.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = len(_stage_runs(cluster["mlflow"]))
    state, logs = _run(cluster, "edited", ["--config", str(config), "--stages", "translate"])
    assert state == "succeeded", logs[-5000:]
    (translate,) = _stage_runs(cluster["mlflow"])[before:]
    assert translate["metrics"]["translated_rows"] == 1.0
