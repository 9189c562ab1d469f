"""Autoscaling with Ray's fake multi-node provider (the v1 autoscaler, real raylets started as nodes on this machine): a
stage's GPU actor pool, as td-ray asks Ray for it, adds GPU nodes to a cluster that has none, and the nodes leave once
idle. The wheel lacks the provider's example config, so the test writes its own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest
import yaml
from conftest import start_session_ray
from processes import BIN, free_port

from td_ray.config import ScoreConfig
from td_ray.raydata import actor_map_args

pytestmark = pytest.mark.slow


def _config(gcs: str) -> dict:
    """A head that takes no work and one GPU node type (2 CPUs: one for a stage's actor, one to read its input), from 0
    to 2 nodes, that leaves after 3 idle seconds."""
    return {
        "cluster_name": "td-ray-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.05,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "disable_launch_config_check": True,
                     "disable_node_updaters": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ray"}, "head_node_type": "ray.head.default", "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 200 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
        },
        **{name: [] for name in ("initialization_commands", "setup_commands", "head_setup_commands",
                                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                 "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def _gpu_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU"))


def test_a_gpu_stage_adds_gpu_nodes_and_idle_ones_leave(tmp_path):
    import ray
    import ray.data

    session = ray.is_initialized()  # the session's cluster, if a test started it: stopped here, started again after
    if session:
        ray.shutdown()
    port = free_port()
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(_config(f"127.0.0.1:{port}")))
    # No token: this process read its Ray settings when it imported ray (the head listens on 127.0.0.1 only)
    env = os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="tdray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                              "--num-cpus=0", f"--autoscaling-config={config}", "--include-dashboard=false",
                              "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    class WhereAmI:  # defined here, so Ray ships it by value to the new nodes' workers
        """Reports the node it runs on and the GPUs Ray gave it."""

        def __call__(self, batch: dict) -> dict:
            context = ray.get_runtime_context()
            return {"node": [context.get_node_id()] * len(batch["id"]),
                    "gpus": [json.dumps([str(gpu) for gpu in ray.get_gpu_ids()])] * len(batch["id"])}

    try:
        ray.init(address=f"127.0.0.1:{port}")
        assert _gpu_nodes() == 0
        pool = ScoreConfig(teacher="t", num_actors=2, num_gpus_per_actor=1, num_cpus_per_actor=1, batch_size=4)
        rows = ray.data.range(16).map_batches(WhereAmI, batch_format="numpy", **actor_map_args(pool)).take_all()
        assert len(rows) == 16 and _gpu_nodes() == 2  # two actors of one GPU each: two GPU nodes were added
        assert {len(json.loads(row["gpus"])) for row in rows} == {1}  # each batch ran on an actor holding one GPU
        deadline = time.time() + 120
        while _gpu_nodes() and time.time() < deadline:
            time.sleep(2)
        assert _gpu_nodes() == 0  # idle, they left
    finally:
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if session:
            start_session_ray()
