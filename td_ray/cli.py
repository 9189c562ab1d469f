"""The `td-ray` command: one subcommand per stage, `run` for all five, `demo` for the offline default."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from td_ray.errors import STORAGE_ERRNOS, TdRayError, is_out_of_memory, root_cause

logger = logging.getLogger("td_ray")


def _config_arguments(sub: argparse.ArgumentParser, help_text: str = "pipeline YAML config",
                      required: bool = True) -> None:
    sub.add_argument("--config", required=required, help=help_text)
    _overrides_argument(sub)


def _overrides_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                     help="override a config field, e.g. --set distill.steps=100 (repeatable; values read as YAML)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="td-ray", description="Translate-Distill on Ray: translate, score, distill, index, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in ("translate", "score", "distill", "index", "evaluate"):
        sub = commands.add_parser(stage, help=f"run the {stage} stage")
        _config_arguments(sub)
        sub.add_argument("--workspace", help="override the config's workspace")
    sub = commands.add_parser("run", help="run all five stages in order under one MLflow run")
    _config_arguments(sub)
    sub.add_argument("--workspace", help="override the config's workspace")
    sub.add_argument("--stages", help="comma-separated subset, e.g. index,evaluate")
    sub = commands.add_parser("demo", help="the embedded demo: tiny models, generated data, local Ray and MLflow")
    sub.add_argument("--workspace", default=None, help="where to work (default ./td-ray-workspace)")
    _overrides_argument(sub)
    sub = commands.add_parser("report", help="write the workspace's HTML report (also written by run and demo)")
    sub.add_argument("--workspace", required=True, help="the workspace to report on")
    _config_arguments(sub, "pipeline YAML config, for its MLflow store (default: MLFLOW_TRACKING_URI, else the "
                      "workspace's sqlite store)", required=False)
    sub = commands.add_parser("promote", help="point the promotion alias (mlflow.promote.alias, default "
                              "champion) at a registered version by hand")
    _config_arguments(sub, "pipeline YAML config, for its MLflow store and model name")
    sub.add_argument("--workspace", help="override the config's workspace")
    sub.add_argument("--version", required=True, help="the registered version to promote")
    sub = commands.add_parser("export", help="write a trained student as a folder sentence-transformers, PyLate or "
                              "PLAID-X loads, with a model card")
    sub.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a student directory")
    sub.add_argument("--format", required=True, choices=["sentence-transformers", "pylate", "plaid-x"],
                     help="sentence-transformers for a dense student; pylate or plaid-x (one layout) for ColBERT-X")
    sub.add_argument("--out", required=True, help="the folder to write (replaced whole)")
    _config_arguments(sub, "pipeline YAML config, for its MLflow registry (default: MLFLOW_TRACKING_URI)",
                      required=False)
    sub.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub repository (HF_TOKEN)")
    sub = commands.add_parser("validate", help="check a config (fields, paths, ir_datasets ids and fields, measures, "
                              "nway against top_k) and print it with every default filled in")
    _config_arguments(sub)
    commands.add_parser("config-schema", help="print the JSON schema of the config, every field described")
    sub = commands.add_parser("make-tiny-models", help="build the tiny offline models into DIR")
    sub.add_argument("directory")
    sub.add_argument("--seed", type=int, default=0)
    sub = commands.add_parser("make-demo-data", help="write the generated demo collection into DIR")
    sub.add_argument("directory")
    sub.add_argument("--seed", type=int, default=0)
    return parser


def _run_stages(config, stages: list[str] | None) -> int:
    import ray

    from td_ray.pipeline import format_summary, run_pipeline

    started = time.perf_counter()
    try:
        results = run_pipeline(config, stages)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(format_summary(results, config))
    print(f"total: {time.perf_counter() - started:.1f}s")
    return 0


def _report(args: argparse.Namespace) -> int:
    from td_ray.config import load_config
    from td_ray.report import write_report
    from td_ray.tracking import tracking_uri
    from td_ray.workspace import Workspace

    if "://" not in args.workspace and not Path(args.workspace).is_dir():
        raise FileNotFoundError(f"workspace {args.workspace} does not exist")
    workspace = Workspace(args.workspace)
    if args.config:
        uri = tracking_uri(load_config(args.config, workspace=args.workspace, overrides=args.overrides))
    elif os.environ.get("MLFLOW_TRACKING_URI") or workspace.is_local:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace.local_dir('mlflow') / 'mlflow.db'}"
    else:
        raise TdRayError(f"the workspace {workspace.location('')} is an object store: give its tracking server as "
                         "MLFLOW_TRACKING_URI or with --config")
    print(f"report: {write_report(args.workspace, uri)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from td_ray.encoders.export import export_student, push_to_hub

    student, lineage = Path(args.model), {}
    with tempfile.TemporaryDirectory(prefix="td-ray-export-") as download:
        if args.model.startswith("models:/"):
            student, lineage = _download_registered(args, Path(download))
        elif not student.is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such directory; name a student directory or a "
                                    "registered models:/NAME@ALIAS")
        out = export_student(student, args.format, Path(args.out), lineage)
    print(f"exported {args.model} as {args.format} into {out}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub)}")
    return 0


def _download_registered(args: argparse.Namespace, folder: Path) -> tuple[Path, dict[str, str]]:
    """The student of a registered version (models:/NAME@ALIAS or models:/NAME/VERSION), downloaded into `folder`,
    and the version's tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from td_ray.config import load_config
    from td_ray.retrieval.layout import student_in_model
    from td_ray.tracking import configure, tracking_uri

    config = load_config(args.config, overrides=args.overrides) if args.config else None
    uri = tracking_uri(config) if config else None
    if config:
        configure(config)  # the registry too, without leaving its URI in the environment
    client = mlflow.MlflowClient()
    name = args.model.removeprefix("models:/")
    try:
        if "@" in name:
            version = client.get_model_version_by_alias(*name.split("@", 1))
        else:
            version = client.get_model_version(*name.rsplit("/", 1))
    except (MlflowException, TypeError) as error:
        raise TdRayError(f"--model {args.model}: no such registered version in {uri or mlflow.get_tracking_uri()} "
                         f"({str(error).splitlines()[0][:160]}); pass --config or MLFLOW_TRACKING_URI for the "
                         "registry, and a name with @alias or /version") from None
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(folder))
    student = student_in_model(folder)
    if student is None:
        raise TdRayError(f"{args.model} (version {version.version}) holds no td-ray student; export a version the "
                         "distill stage registered")
    return student, {"td_ray.registered": f"{version.name} version {version.version}"} | dict(version.tags)


def _promote_by_hand(config, version: str) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from td_ray.tracking import tracking_uri

    alias = config.mlflow.promote.alias if config.mlflow.promote else "champion"
    client = MlflowClient(tracking_uri(config))
    try:
        client.get_model_version(config.mlflow.registered_model, version)
    except MlflowException:
        raise TdRayError(f"{config.mlflow.registered_model} has no version {version} in {tracking_uri(config)}; "
                         "name a registered version") from None
    client.set_registered_model_alias(config.mlflow.registered_model, alias, version)
    print(f"@{alias} -> version {version} of {config.mlflow.registered_model}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from td_ray.config import PipelineConfig, load_config

    if args.command == "config-schema":
        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        return 0
    if args.command == "validate":
        import yaml

        from td_ray.preflight import check_config

        config = load_config(args.config, overrides=args.overrides)
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        findings = check_config(config)
        for finding in findings:
            print(finding, file=sys.stderr)
        errors = sum(finding.severity == "error" for finding in findings)
        print(f"{args.config}: {errors} error(s), {len(findings) - errors} warning(s)", file=sys.stderr)
        return 1 if errors else 0
    if args.command == "make-tiny-models":
        from td_ray.assets.tiny_models import build_tiny_models

        models = build_tiny_models(Path(args.directory), seed=args.seed)
        print(f"tiny models in {models.root}")
        return 0
    if args.command == "make-demo-data":
        from td_ray.assets.demo_data import write_demo_collection

        for name, path in write_demo_collection(Path(args.directory), seed=args.seed).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "demo":
        from td_ray.pipeline import demo_config

        return _run_stages(demo_config(args.workspace, args.overrides), None)
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        return _report(args)
    config = load_config(args.config, workspace=args.workspace, overrides=args.overrides)
    if args.command == "promote":
        return _promote_by_hand(config, args.version)
    if args.command == "run":
        return _run_stages(config, args.stages.split(",") if args.stages else None)
    return _run_stages(config, [args.command])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # FAISS says at INFO which of its builds it tried to load, on every import
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except Exception as error:
        message = user_message(error)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"td-ray: error: {message}", file=sys.stderr)
        return 2


def user_message(error: BaseException) -> str | None:
    """The one line a user reads for `error`, found under Ray's wrappers (`root_cause`): a td-ray error's message,
    a missing file, or a storage failure named with its fix; None for anything else (a bug: its traceback shows)."""
    cause = root_cause(error)
    if isinstance(cause, (TdRayError, FileNotFoundError)):
        # Ray Data appends its retry advice to an error raised in an actor: the message is the first line
        return str(cause) if cause is error else str(cause).split("\n", 1)[0]
    if is_out_of_memory(cause):
        said = str(cause).split("\n", 1)[0][:200]
        return (f"a GPU ran out of memory ({said}): lower the stage's batch (score.max_batch_tokens or batch_size, "
                "distill.batch_size with grad_accum_steps to keep the effective batch, index.batch_size, "
                "translate.batch_size) or give each worker more of a GPU (num_gpus_per_actor, "
                "distill.gpus_per_worker), then run the same command again; it resumes from what was committed")
    if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
        where = f" ({cause.filename})" if cause.filename else ""
        return (f"{os.strerror(cause.errno).lower()}{where}: free space on the workspace's disk, or make it writable, "
                "then run the same command again; it resumes from what was committed")
    return None


if __name__ == "__main__":
    sys.exit(main())
