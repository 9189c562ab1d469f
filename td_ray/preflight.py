"""A config checked against what exists, before any stage runs: the mistakes that would otherwise surface hours
later, after translate and score were paid for, or never (a silent wrong choice).

Every finding names the field and the fix. `td-ray validate` prints them all; `run` and the job stop on an error
before Ray starts. Everything is checked offline: ir_datasets ids and record fields against ir_datasets' registry,
measure names with ir_measures' parser, hub ids by their syntax.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from td_ray.config import IrDatasetsSource, PipelineConfig, suggestion

__all__ = ["Finding", "check_config", "is_hub_id", "is_local_reference"]

HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A Hugging Face hub repository id: `name` or `owner/name`, of letters, digits, `-`, `_` and `.`."""

ROLES = {"data.passages": "docs", "data.train_queries": "queries", "data.candidates": "scoreddocs",
         "data.train_qrels": "qrels", "data.eval_docs": "docs", "data.eval_topics": "queries",
         "data.eval_qrels": "qrels"}
"""What each data field reads from its source."""


@dataclass(frozen=True)
class Finding:
    """One problem of a config: `field` and a message that says what is wrong and how to fix it."""

    field: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.field}: {self.message}"


def check_config(config: PipelineConfig, building: Iterable[str | None] = ()) -> list[Finding]:
    """Every finding for `config`, errors and warnings, in the config's order; the model directories in `building`
    are being built (the demo's teacher) and need not exist yet."""
    findings = _missing_inputs(config) + _models(config, set(building))
    for field, source in _ir_datasets_sources(config):
        findings += _ir_dataset(field, source)
    return findings + _measures(config) + _nway(config)


def is_local_reference(value: str) -> bool:
    """Whether a model reference names a local directory rather than a hub id: an absolute or `.`/`~` path, one
    with more than one `/` (a hub id has at most one), or one that exists.

    >>> [is_local_reference(v) for v in ("/models/student", "./student", "BAAI/bge-m3", "a/b/c")]
    [True, True, False, True]
    """
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).expanduser().exists())


def is_hub_id(value: str) -> bool:
    """Whether `value` can name a hub repository (the hub also refuses `--`, `..` and names over 96 characters).

    >>> [is_hub_id(v) for v in ("cross-encoder/ms-marco-MiniLM-L6-v2", "castorini/monot5 3b", "a--b", "x/y")]
    [True, False, False, True]
    """
    return bool(HUB_ID.match(value)) and "--" not in value and ".." not in value and len(value) <= 96


def _missing_inputs(config: PipelineConfig) -> list[Finding]:
    return [Finding(f"{field}.path", f"{source.path} does not exist; correct the path (a relative one is read from "
                                     "the directory td-ray runs in; `{workspace}` stands for the workspace root)")
            for field, source in config.local_sources() if not Path(source.path).expanduser().exists()]


def _models(config: PipelineConfig, building: set[str | None]) -> list[Finding]:
    """Model references: a local one must exist, any other must be a hub id."""
    references = [(f"translate.targets[{target.lang}].model", target.model) for target in config.translate.targets]
    references += [("score.teacher", config.score.teacher), ("distill.student", config.distill.student),
                   ("index.model", config.index.model)]
    findings = []
    for field, value in references:
        if value is None or value.startswith("models:/") or value in building:
            continue
        if is_local_reference(value):
            if not Path(value).expanduser().exists():
                findings.append(Finding(field, f"the directory {value} does not exist; correct the path, or name a "
                                               "hub model as owner/name"))
        elif not is_hub_id(value):
            findings.append(Finding(field, f"{value!r} is neither an existing directory nor a hub id (owner/name: "
                                           "letters, digits, `-`, `_` and `.`); correct it"))
    return findings


def _ir_datasets_sources(config: PipelineConfig) -> list[tuple[str, IrDatasetsSource]]:
    found = [(f"data.{name}", source) for name, source in config.data if isinstance(source, IrDatasetsSource)]
    for target in config.translate.targets:
        for kind in ("pretranslated", "pretranslated_queries"):
            source = getattr(target, kind)
            if isinstance(source, IrDatasetsSource):
                found.append((f"translate.targets[{target.lang}].{kind}", source))
    return found


def _role(field: str) -> str:
    if field.startswith("translate."):
        return "queries" if field.endswith("pretranslated_queries") else "docs"
    return ROLES[field]


def _ir_dataset(field: str, source: IrDatasetsSource) -> list[Finding]:
    """The id is registered, the dataset provides the field's role, and `text_fields` are fields of its records."""
    import ir_datasets

    known = list(ir_datasets.registry._registered)
    if source.id not in known:
        return [Finding(f"{field}.id", f"{source.id!r} is not an ir_datasets id (they are listed at "
                                       f"https://ir-datasets.com){suggestion(source.id, known, most=3)}")]
    dataset, role = ir_datasets.load(source.id), _role(field)
    if not getattr(dataset, f"has_{role}")():
        offered = [name for name in ("docs", "queries", "qrels", "scoreddocs") if getattr(dataset, f"has_{name}")()]
        return [Finding(f"{field}.id", f"{source.id!r} has no {role} (it has {', '.join(offered) or 'nothing'}); "
                                       f"name a dataset that provides the {role}, e.g. a subset of it")]
    findings = []
    if role in ("docs", "queries"):
        fields = [name for name in getattr(dataset, f"{role}_cls")()._fields if name not in ("doc_id", "query_id")]
        for name in source.text_fields or ["text"]:
            if name not in fields:
                where = f"{field}.text_fields" if source.text_fields else field
                findings.append(Finding(where, f"{source.id!r} {role} have no field {name!r}; set text_fields to some "
                                               f"of {fields}{suggestion(name, fields)}"))
    if role == "scoreddocs":
        findings.append(Finding(field, f"candidates from {source.id!r} scoreddocs are the dataset's own lists, whose "
                                       "order and scores may not be a ranking (MS MARCO's train scoreddocs are not); "
                                       "prefer a TREC run of your first-stage retriever (format: trec_run)",
                                "warning"))
    return findings


def _measures(config: PipelineConfig) -> list[Finding]:
    import ir_measures

    names = sorted(ir_measures.measures.registry)
    findings = []
    for measure in config.evaluate.measures:
        try:
            ir_measures.parse_measure(measure)
        except (NameError, ValueError, SyntaxError, TypeError) as error:
            findings.append(Finding("evaluate.measures", f"{measure!r} is not an ir_measures measure ({error}); use "
                                                         "names such as nDCG@20, R@100, RR@10, AP"
                                                         f"{suggestion(measure.split('@')[0], names)}"))
    return findings


def _nway(config: PipelineConfig) -> list[Finding]:
    """A teacher keeps score.top_k candidates per query; distill needs nway of them (nway - 1 negatives with qrels
    positives, which may lie outside the list)."""
    if config.score.import_scores is not None:
        return []
    needed = config.distill.nway - (1 if config.distill.positives == "qrels" else 0)
    if needed <= config.score.top_k:
        return []
    return [Finding("distill.nway", f"{config.distill.nway} passages per query, but score.top_k keeps "
                                    f"{config.score.top_k} candidates per query: every query would be dropped after "
                                    f"translate and score have run; lower distill.nway to at most "
                                    f"{config.score.top_k + (config.distill.positives == 'qrels')} or raise "
                                    "score.top_k")]
