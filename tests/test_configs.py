"""The shipped configs: every config under configs/ (paper/ and translate/ included) loads, the light configs and
the paper's configs (configs/paper/) mean what they say, the demo config resolves `{workspace}`, and the cluster
files under cluster/ are valid YAML of the right kind."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from td_ray.config import (
    IrDatasetsSource,
    PipelineConfig,
    TrecRunSource,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
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
    assert config.distill.mixed_precision == "auto"
    assert config.distill.lr == pytest.approx(5e-6)
    assert (config.distill.query_maxlen, config.distill.passage_maxlen) == (32, 180)
    assert config.distill.student == "xlm-roberta-large"
    # Real runs go to a GPU cluster the job was submitted to.
    assert config.ray.address == "auto"
    assert config.distill.use_gpu and config.distill.num_workers == 8 and config.distill.batch_size == 8
    assert config.score.num_gpus_per_actor > 0 and config.index.num_gpus_per_actor > 0
    # Inputs: English MS MARCO for training, the NeuCLIR 2022 collection of the student's language for evaluation.
    for field in ("passages", "train_queries"):
        source = getattr(config.data, field)
        assert isinstance(source, IrDatasetsSource) and source.id == "msmarco-passage/train", field
    # Candidates: a first-stage TREC run (ColBERTv2), never ir_datasets' unranked BM25 scoreddocs.
    assert isinstance(config.data.candidates, TrecRunSource)
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


def _header(path: Path) -> str:
    """The comment block before the first key (every config starts with its `workspace:`)."""
    text = path.read_text(encoding="utf-8")
    assert "\nworkspace:" in text, path
    header = text.split("\nworkspace:", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines()), f"{path}: the header must be comments only"
    return header


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_real_config_says_what_it_is(path: Path, tmp_path: Path):
    """The light configs: a cross-encoder teacher and a dense student, and the header says so and points to the
    paper's settings, which exist now (no "later issue" left)."""
    header = _header(path)
    assert "Translate-Distill" in header
    assert "later issue" not in header and "NOT yet" not in header
    assert "configs/paper/" in header and PAPER
    assert "cross-encoder" in header and "ColBERT-X" in header and "mixed precision" in header
    config = load_config(path, workspace=str(tmp_path))
    assert config.score.teacher_kind == "cross_encoder" and config.score.import_scores is None
    assert config.score.teacher == "cross-encoder/ms-marco-MiniLM-L6-v2"
    assert config.distill.student_kind == "dense" and config.distill.pooling == "cls"
    assert (config.distill.loss, config.distill.sampler) == ("kl", "only_top")


# ------------------------------------------------------------------------------------------- every config
def test_every_config_directory_is_collected():
    folders = {path.parent.relative_to(ROOT / "configs").as_posix() for path in ALL_CONFIGS}
    assert {".", "paper", "translate"} <= folders


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda path: path.relative_to(ROOT / "configs").as_posix())
def test_every_config_validates(path: Path, tmp_path: Path):
    config = load_config(path, workspace=str(tmp_path))
    assert isinstance(config, PipelineConfig)
    assert config.workspace == str(tmp_path.resolve())
    assert "{workspace}" not in json.dumps(config.model_dump(mode="json"))
    assert _header(path).startswith("#")
    # A submit line in the header names this very file and the real job entry point.
    assert f"--config {path.relative_to(ROOT).as_posix()}" in path.read_text(encoding="utf-8")
    assert (ROOT / "jobs" / "pipeline.py").is_file()


# ------------------------------------------------------------------------------------------ configs/paper
LANGS = ("zh", "fa", "ru")
CODE3 = {"zh": "zho", "fa": "fas", "ru": "rus"}
MIXINGS = ("mix-passages", "mix-entries", "round-robin")
TEACHERS = {"t53b": ("castorini/monot5-3b-msmarco-10k", "true", "false"),
            "mt5xxl": ("unicamp-dl/mt5-13b-mmarco-100k", "yes", "no")}
MONOT5_TEMPLATE = "Query: {query} Document: {document} Relevant:"
SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\ python jobs/pipeline.py --config "


def test_paper_configs_are_exactly_the_expected_twelve():
    expected = {f"td-{teacher}-{lang}.yaml" for teacher in TEACHERS for lang in LANGS}
    expected |= {f"tt-{lang}.yaml" for lang in LANGS} | {f"mtd-{mixing}.yaml" for mixing in MIXINGS}
    assert len(expected) == 12
    assert {path.name for path in PAPER} == expected


def _gpu_pod_cpus() -> int:
    """CPUs of the GPU worker pods in cluster/kuberay-rayjob.yaml at most (the autoscaler's maxReplicas), where the
    training workers run."""
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text(encoding="utf-8"))
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return sum(int(group["maxReplicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for group in groups if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"])


@pytest.mark.parametrize("path", PAPER, ids=lambda path: path.name)
def test_paper_config_follows_the_recipe(path: Path, tmp_path: Path):
    """What every paper config shares: PLAID-X 0.3.1's ColBERT-X student and optimiser, 8 GPUs x 8, neuMARCO."""
    config = load_config(path, workspace=str(tmp_path))
    distill, score = config.distill, config.score
    assert (distill.student, distill.student_kind, distill.colbert_dim) == ("xlm-roberta-large", "colbert", 128)
    assert distill.lr == pytest.approx(5e-6) and distill.steps == 200_000 and distill.warmup_steps == 0
    assert distill.nway == 6 and distill.alpha == pytest.approx(1.0)
    assert (distill.query_maxlen, distill.passage_maxlen) == (32, 180)
    assert config.evaluate.query_maxlen == 32 and config.index.max_length >= 183  # 180 tokens + [CLS] [D] [SEP]
    assert (config.index.passages.length, config.index.passages.stride) == (180, 90)
    assert config.evaluate.passage_depth == 2500
    assert distill.mixed_precision != "off"
    assert 1000 <= distill.checkpoint_every <= 10_000 and distill.max_failures > 0
    assert score.top_k == 50
    # Runnable on a GPU cluster: 8 GPU workers x 8 queries, GPU actors, and CPUs left for Ray Data.
    assert config.ray.address == "auto"
    assert distill.use_gpu and (distill.num_workers, distill.batch_size, distill.grad_accum_steps) == (8, 8, 1)
    assert distill.num_workers * distill.cpus_per_worker < _gpu_pod_cpus()
    assert config.index.num_gpus_per_actor > 0 and config.translate.num_gpus_per_actor > 0
    if score.teacher is not None:
        assert score.num_gpus_per_actor > 0
    # Training data: English MS MARCO queries, neuMARCO passages for every language the student sees.
    for field in ("passages", "train_queries"):
        source = getattr(config.data, field)
        assert isinstance(source, IrDatasetsSource) and source.id == "msmarco-passage/train", field
    targets = {target.lang: target for target in config.translate.targets}
    assert set(targets) == set(distill.passage_langs)
    for lang, target in targets.items():
        assert isinstance(target.pretranslated, IrDatasetsSource) and target.model is None
        assert target.pretranslated.id == f"neumarco/{lang}/train"
    assert config.data.eval_docs.text_fields == ["title", "text"] and config.data.eval_topics.text_fields == ["title"]
    assert {"nDCG@20", "AP", "R@100", "R@1000"} <= set(config.evaluate.measures) and config.evaluate.depth == 1000
    # The header: what it reproduces, how to submit it, what differs.
    header = _header(path)
    words = " ".join(line.lstrip("#").strip() for line in header.splitlines())
    assert f"{SUBMIT}configs/paper/{path.name} --workspace " in words
    assert "What differs from the paper:" in header and "180/90" in header and "MaxP" in header
    assert "Compressed token index (index.colbert, PLAID-style)" in header and "codec task holds about" in header
    assert ("ECIR 2024" if path.name.startswith(("td-", "tt-")) else "SIGIR 2024") in header


def test_paper_configs_do_not_share_a_workspace_run_or_model():
    configs = [load_config(path) for path in PAPER]
    for key in (lambda c: c.workspace, lambda c: c.distill.run_name, lambda c: c.mlflow.registered_model,
                lambda c: c.evaluate.run_tag):
        assert len({key(config) for config in configs}) == len(PAPER)


def _published(header: str) -> set[str]:
    """The hltcoe/tdist-msmarco-scores files a header names."""
    return set(re.findall(r"\b(?:t53b|mt5xxl)-monot5-(?:msmarco|mmarco)-[a-z]{6}\.jsonl\.gz", header))


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("lang", LANGS)
def test_paper_translate_distill(teacher: str, lang: str, tmp_path: Path):
    path = ROOT / "configs" / "paper" / f"td-{teacher}-{lang}.yaml"
    config = load_config(path, workspace=str(tmp_path))
    score, distill = config.score, config.distill
    model, true_word, false_word = TEACHERS[teacher]
    # The seq2seq teacher, its answer words (quoted in YAML: a bare yes / no would be a boolean) and template.
    assert (score.teacher, score.teacher_kind, score.import_scores) == (model, "seq2seq", None)
    assert (score.true_word, score.false_word, score.template) == (true_word, false_word, MONOT5_TEMPLATE)
    # t53b scores English x English; mt5xxl scores English queries x the translated passages.
    assert score.query_lang == "en"
    assert score.passage_lang == ("en" if teacher == "t53b" else lang)
    # The student: English queries x this language's passages, KL to the teacher, the nway best of the 50.
    assert distill.passage_lang == lang and distill.passage_langs == [lang]
    assert (distill.loss, distill.sampler, distill.positives) == ("kl", "only_top", "teacher")
    # Candidates: a first-stage TREC run (ColBERTv2), never ir_datasets' unranked BM25 scoreddocs.
    assert isinstance(config.data.candidates, TrecRunSource)
    assert config.data.train_qrels is None
    for field in ("eval_docs", "eval_topics", "eval_qrels"):
        assert getattr(config.data, field).id == f"neuclir/1/{lang}/trec-2022", field
    # The header names the published score file of exactly this setting, and its import swap validates.
    header = _header(path)
    published = f"{teacher}-monot5-msmarco-engeng.jsonl.gz" if teacher == "t53b" else \
        f"mt5xxl-monot5-mmarco-eng{CODE3[lang]}.jsonl.gz"
    assert _published(header) == {published}
    assert f"hltcoe/plaidx-large-{CODE3[lang]}-tdist-{teacher}-" in header
    swap = re.search(r"import_scores: (\{format: colbertx, path: \S+\})", header)
    assert swap and swap.group(1).endswith(f"/{published}}}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["score"].pop("teacher")
    raw["score"]["import_scores"] = yaml.safe_load(swap.group(1))
    assert parse_config(raw, workspace=str(tmp_path)).score.provenance == f"import:colbertx:{published}"


@pytest.mark.parametrize("lang", LANGS)
def test_paper_translate_train(lang: str, tmp_path: Path):
    path = ROOT / "configs" / "paper" / f"tt-{lang}.yaml"
    config = load_config(path, workspace=str(tmp_path))
    distill = config.distill
    assert (distill.loss, distill.positives) == ("contrastive", "qrels")
    assert isinstance(config.data.train_qrels, IrDatasetsSource) and config.data.train_qrels.id == "msmarco-passage/train"
    # Negatives drawn uniformly from the candidates, so the imported scores never choose them.
    assert distill.sampler == "random" and not distill.in_batch_negatives
    assert distill.passage_langs == [lang]
    source = config.score.import_scores
    assert config.score.teacher is None and source is not None and source.format == "colbertx"
    assert Path(source.path).name == "t53b-monot5-msmarco-engeng.jsonl.gz"
    assert _published(_header(path)) == {Path(source.path).name}
    for field in ("eval_docs", "eval_topics", "eval_qrels"):
        assert getattr(config.data, field).id == f"neuclir/1/{lang}/trec-2022", field


def test_paper_multilingual_translate_distill(tmp_path: Path):
    mixings = []
    for path in sorted((ROOT / "configs" / "paper").glob("mtd-*.yaml")):
        config = load_config(path, workspace=str(tmp_path))
        distill = config.distill
        mixings.append(distill.mixing)
        assert path.stem == f"mtd-{distill.mixing}"
        assert isinstance(distill.passage_lang, list) and distill.passage_langs == list(LANGS)
        assert (distill.loss, distill.sampler, distill.positives) == ("kl", "only_top", "teacher")
        # The released MTD students were distilled from mT5-XXL on English x English (mt5xxl-engeng).
        source = config.score.import_scores
        assert config.score.teacher is None and source is not None and source.format == "colbertx"
        assert Path(source.path).name == "mt5xxl-monot5-mmarco-engeng.jsonl.gz"
        assert "mt5xxl-engeng" in _header(path)
        # NeuCLIR multilingual: the one multilingual set ir_datasets has.
        for field in ("eval_docs", "eval_topics", "eval_qrels"):
            assert getattr(config.data, field).id == "neuclir/1/multi/trec-2023", field
    assert sorted(mixings) == sorted(MIXINGS)  # each mode exactly once


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
    gpus = sum(int(group["maxReplicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"]) for group in cluster["workerGroupSpecs"])
    assert gpus >= target.distill.num_workers

    # it autoscales from zero workers, the head takes no work, a failed job is retried, and the job id is the
    # fingerprint of the config and workspace it submits (the same submission twice is a duplicate)
    assert cluster["enableInTreeAutoscaling"] is True and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(group["minReplicas"] == group["replicas"] == 0 for group in cluster["workerGroupSpecs"])
    assert job["spec"]["backoffLimit"] >= 1
    fingerprint = load_config(ROOT / config, workspace=workspace).fingerprint()
    assert job["spec"]["jobId"] == f"td-ray-msmarco-zh-{fingerprint}", (
        "the config (or a default of td-ray's config) changed: set the RayJob's jobId to td-ray-msmarco-zh-"
        f"{fingerprint}")


def _strict(schema):
    """The schema with unknown fields forbidden wherever it lists the fields (Kubernetes drops unknown fields
    silently; a typo would then simply not apply)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@pytest.mark.skipif(not (ROOT.parent / "shared" / "schemas" / "ray.io_rayjobs.yaml").is_file(),
                    reason="../shared/schemas is absent")
def test_rayjob_follows_kuberays_schema():
    """cluster/kuberay-rayjob.yaml against KubeRay v1.7.0's RayJob CRD, unknown fields refused."""
    import jsonschema

    crd = yaml.safe_load((ROOT.parent / "shared" / "schemas" / "ray.io_rayjobs.yaml").read_text(encoding="utf-8"))
    schema = next(version for version in crd["spec"]["versions"] if version["name"] == "v1")["schema"]
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text(encoding="utf-8"))
    errors = [f"{list(error.path)}: {error.message[:160]}"
              for error in jsonschema.Draft7Validator(_strict(schema["openAPIV3Schema"])).iter_errors(job)]
    assert not errors
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscalling"] = True  # a typo is caught
    assert any("enableInTreeAutoscalling" in error.message
               for error in jsonschema.Draft7Validator(schema["openAPIV3Schema"]).iter_errors(job))


def test_the_autoscaler_config_passes_rays_own_checks():
    """cluster/autoscaler.yaml as `ray up` reads it: Ray's defaults filled in (prepare_config), then its schema
    (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "autoscaler.yaml").read_text(encoding="utf-8"))
    validate_config(prepare_config(config))
    broken = config | {"max_workerz": 6}
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_multilingual_translate_config_steers_one_model_per_language(tmp_path: Path):
    config = load_config(ROOT / "configs" / "translate" / "msmarco-nllb-zh-fa-ru.yaml", workspace=str(tmp_path))
    targets = config.translate.targets
    assert [target.lang for target in targets] == ["zh", "fa", "ru"]
    assert len({target.model for target in targets}) == 1 and len({target.target_prefix for target in targets}) == 3
    assert {target.source_prefix for target in targets} == {"eng_Latn"}
    assert config.translate.max_actors > config.translate.num_actors  # an autoscaling pool
