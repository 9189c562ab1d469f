"""Connect to Ray once per process: a local cluster by default, or the cluster a job runs on."""
from __future__ import annotations

import logging
import os

from td_ray.config import RayConfig

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
        logger.info("started a local Ray cluster with %s CPUs", ray.cluster_resources().get("CPU"))
