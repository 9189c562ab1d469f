"""Entry point for `ray job submit`: runs the pipeline on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/msmarco-zh.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --demo --workspace /shared/td-ray-demo
"""
from __future__ import annotations

import argparse
import logging
import sys

from td_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the td-ray pipeline as a Ray job.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="pipeline YAML config")
    source.add_argument("--demo", action="store_true", help="the embedded demo config")
    parser.add_argument("--workspace", help="override the workspace (use storage every node can reach)")
    parser.add_argument("--stages", help="comma-separated subset of stages")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set distill.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    overrides = [part for override in args.overrides for part in ("--set", override)]
    logging.getLogger(__name__).info("td-ray job starting")
    if args.demo:
        return cli_main(["demo"] + (["--workspace", args.workspace] if args.workspace else []) + overrides)
    command = ["run", "--config", args.config]
    command += ["--workspace", args.workspace] if args.workspace else []
    command += ["--stages", args.stages] if args.stages else []
    command += overrides
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
