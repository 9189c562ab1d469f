"""The shipped configs: every real-run config under configs/ loads and means what it says, the demo config
resolves `{workspace}`, and the cluster files under cluster/ are valid YAML of the right kind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from td_ray.config import IrDatasetsSource, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CLUSTER = sorted((ROOT / "cluster").glob("*.yaml"))
DATA_FIELDS = ("passages", "train_queries", "candidates", "eval_docs", "eval_topics", "eval_qrels")


def test_configs_exist():
    assert {path.name for path in CONFIGS} >= {
        "msmarco-zh.yaml", "msmarco-zh-opusmt.yaml", "msmarco-fa.yaml", "msmarco-ru.yaml"
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_real_config_loads_and_follows_the_recipe(path: Path, tmp_path: Path):
    config = load_config(path, workspace=str(tmp_path))
    assert isinstance(config, PipelineConfig)
    assert config.workspace == str(tmp_path)
    targets = {target.lang: target for target in config.translate.targets}
    # The student trains on a language the translate stage produces, against English-passage teacher scores.
    assert config.distill.passage_lang in targets
    assert config.score.passage_lang == "en"
    # The paper's sizes: top 50 candidates, nway 6, lr 5e-6, query 32 and passage 180 tokens, xlm-roberta-large.
    assert config.score.top_k == 50
    assert config.distill.nway == 6
    assert config.distill.lr == pytest.approx(5e-6)
    assert (config.distill.query_maxlen, config.distill.passage_maxlen) == (32, 180)
    assert config.distill.student == "xlm-roberta-large"
    # Real runs go to a GPU cluster the job was submitted to.
    assert config.ray.address == "auto"
    assert config.distill.use_gpu and config.distill.num_workers == 8 and config.distill.batch_size == 8
    assert config.score.num_gpus_per_actor > 0 and config.index.num_gpus_per_actor > 0
    # Inputs: English MS MARCO for training, the NeuCLIR 2022 collection of the student's language for evaluation.
    for field in ("passages", "train_queries", "candidates"):
        source = getattr(config.data, field)
        assert isinstance(source, IrDatasetsSource) and source.id == "msmarco-passage/train", field
    lang = config.distill.passage_lang
    for field in ("eval_docs", "eval_topics", "eval_qrels"):
        source = getattr(config.data, field)
        assert isinstance(source, IrDatasetsSource) and source.id == f"neuclir/1/{lang}/trec-2022", field
    assert config.data.eval_docs.text_fields == ["title", "text"]
    assert config.data.eval_topics.text_fields == ["title"]
    assert "nDCG@20" in config.evaluate.measures
    # The target comes from neuMARCO or from an opus-mt model, per the file's name.
    target = targets[lang]
    if "opusmt" in path.stem:
        assert target.model == f"Helsinki-NLP/opus-mt-en-{lang}" and target.pretranslated is None
        assert config.translate.num_gpus_per_actor > 0
    else:
        assert isinstance(target.pretranslated, IrDatasetsSource)
        assert target.pretranslated.id == f"neumarco/{lang}/train" and target.model is None
    assert path.stem.startswith(f"msmarco-{lang}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_real_config_says_what_it_reproduces(path: Path):
    header = path.read_text(encoding="utf-8").split("\nworkspace:", 1)[0]
    assert header.startswith("#") and "Translate-Distill" in header
    assert "later issue" in header  # its limits: the paper's monoT5/mT5 teachers are not there yet


def test_demo_config_resolves_workspace_everywhere(tmp_path: Path):
    from td_ray.pipeline import demo_config

    config = demo_config(str(tmp_path))
    assert config.workspace == str(tmp_path.resolve())
    paths = [getattr(config.data, field).path for field in DATA_FIELDS]
    paths += [target.pretranslated.path for target in config.translate.targets if target.pretranslated]
    paths += [target.model for target in config.translate.targets if target.model]
    paths += [config.score.teacher, config.distill.student]
    for path in paths:
        assert path.startswith(str(tmp_path.resolve()) + "/"), path
    assert "{workspace}" not in json.dumps(config.model_dump(mode="json"))


def test_a_typo_in_a_real_config_names_the_field(tmp_path: Path):
    from td_ray.config import ConfigError

    raw = yaml.safe_load((ROOT / "configs" / "msmarco-zh.yaml").read_text(encoding="utf-8"))
    raw["distill"]["n_way"] = raw["distill"].pop("nway")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"distill\.n_way"):
        load_config(broken)


# ------------------------------------------------------------------------------------------------ cluster/
def test_cluster_files_exist():
    assert {path.name for path in CLUSTER} >= {"autoscaler.yaml", "kuberay-rayjob.yaml"}


@pytest.mark.parametrize("path", CLUSTER, ids=lambda path: path.name)
def test_cluster_yaml_parses_and_has_its_keys(path: Path):
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    if "kind" not in document:  # a Ray cluster launcher config
        assert {"cluster_name", "available_node_types", "head_node_type"} <= set(document)
        assert document["head_node_type"] in document["available_node_types"]
    elif document["kind"] == "RayJob":
        assert document["apiVersion"] == "ray.io/v1"
        spec = document["spec"]
        assert "jobs/pipeline.py" in spec["entrypoint"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert {"headGroupSpec", "workerGroupSpecs"} <= set(spec["rayClusterSpec"])
    else:
        assert document["kind"] == "PersistentVolumeClaim"
        assert "ReadWriteMany" in document["spec"]["accessModes"]


def test_autoscaler_config_matches_rays_schema():
    import os

    import jsonschema
    import ray

    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray install has no {schema_path.name}")
    config = yaml.safe_load((ROOT / "cluster" / "autoscaler.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(config, json.loads(schema_path.read_text(encoding="utf-8")))
    types = config["available_node_types"]
    assert any(node["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for node in types.values())
    assert any("pip install" in command and ".[gpu]" in command for command in config["setup_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_rayjob_runs_a_config_that_exists_and_mounts_the_workspace():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text(encoding="utf-8"))
    words = job["spec"]["entrypoint"].split()
    config = words[words.index("--config") + 1]
    workspace = words[words.index("--workspace") + 1]
    target = load_config(ROOT / config)
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        mounts = [mount["mountPath"] for container in pod["spec"]["containers"] for mount in container["volumeMounts"]]
        assert any(workspace.startswith(mount.rstrip("/") + "/") for mount in mounts), mounts
    gpus = sum(int(group["replicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for group in cluster["workerGroupSpecs"])
    assert gpus >= target.distill.num_workers


def test_multilingual_translate_config_steers_one_model_per_language(tmp_path: Path):
    config = load_config(ROOT / "configs" / "translate" / "msmarco-nllb-zh-fa-ru.yaml", workspace=str(tmp_path))
    targets = config.translate.targets
    assert [target.lang for target in targets] == ["zh", "fa", "ru"]
    assert len({target.model for target in targets}) == 1 and len({target.target_prefix for target in targets}) == 3
    assert {target.source_prefix for target in targets} == {"eng_Latn"}
    assert config.translate.max_actors > config.translate.num_actors  # an autoscaling pool
