"""Connect to Ray once per process: a local cluster by default, or the cluster a job runs on."""
from __future__ import annotations

import logging
import os
import uuid

from td_ray import reaper
from td_ray.config import RayConfig
from td_ray.errors import TdRayError
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)


def ensure_ray(config: RayConfig) -> None:
    """Start or join Ray unless this process is already connected (tests share one session)."""
    import ray

    if ray.is_initialized():
        return
    # Workers inherit these: no MLflow telemetry calls from a machine without internet.
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a submitted job keeps the runtime_env it was submitted with
        logger.info("joined Ray cluster at %s", address)
    else:
        # address="local": always a fresh cluster of our own, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=config.num_cpus, dashboard_host="127.0.0.1", runtime_env={"env_vars": env})
        reaper.start()  # a killed driver's cluster processes end with it
        logger.info("started a local Ray cluster with %s CPUs", ray.cluster_resources().get("CPU"))


_CHECKED: set[str] = set()


def check_every_node_sees(workspace: Workspace) -> None:
    """Refuse a local workspace that a node of the cluster does not see (a path no shared filesystem holds there):
    the driver writes a marker into it, and a task pinned to each alive node looks for it. Checked once per
    workspace and process; an object-store workspace needs no check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not workspace.is_local or workspace.uri in _CHECKED:
        return
    marker = f".td_ray/node-check-{uuid.uuid4().hex}"
    workspace.write_text(marker, "td-ray: this workspace is visible here\n")
    try:
        look = ray.remote(num_cpus=0)(os.path.exists)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        found = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                         .remote(workspace.path(marker)) for node in nodes])
    finally:
        workspace.fs.delete_file(workspace.path(marker))
    blind = [node["NodeManagerAddress"] for node, seen in zip(nodes, found) if not seen]
    if blind:
        raise TdRayError(
            f"the workspace {workspace.root} is a local path that {len(blind)} of the cluster's {len(nodes)} nodes do "
            f"not see ({', '.join(blind)}): their tasks would read and write another disk. Use a workspace every node "
            "reaches: an object store (workspace: s3://bucket/prefix, with mlflow.tracking_uri set) or a filesystem "
            "mounted at the same path on every node (NFS, EFS, Lustre, a Kubernetes volume)"
        )
    _CHECKED.add(workspace.uri)
