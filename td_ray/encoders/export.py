"""A trained student as a folder other libraries load, giving the vectors td-ray gives: the sentence-transformers
layout for a dense student; the PLAID-X (HF_ColBERT) layout for a ColBERT-X one, which PLAID-X, Stanford ColBERT and
PyLate load. td-ray saves students in these layouts already; exporting re-saves through td-ray's loader (so a
student saved by an older td-ray comes out in today's layout) and adds a model card."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from td_ray.encoders.spec import is_colbert
from td_ray.errors import ModelError

logger = logging.getLogger(__name__)

FORMATS = {"sentence-transformers": "dense", "plaid-x": "colbert", "pylate": "colbert"}
"""Export formats and the student kind each holds."""


def export_student(student: Path, fmt: str, out: Path, lineage: dict[str, str]) -> Path:
    """Write `student` into `out` in format `fmt` with a model card made from `lineage` (the registered version's
    tags); `out` appears whole or not at all. Returns `out`."""
    kind = "colbert" if is_colbert(student) else "dense"
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    if FORMATS[fmt] != kind:
        fitting = sorted(name for name, holds in FORMATS.items() if holds == kind)
        raise ModelError(f"{student} is a {kind} student, which the {fmt} format cannot hold; use {' or '.join(fitting)}")
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    if kind == "dense":
        import json

        from transformers import AutoTokenizer

        from td_ray.encoders.dense import DualEncoder

        settings = student / "sentence_bert_config.json"
        max_length = json.loads(settings.read_text())["max_seq_length"] if settings.is_file() else 512
        DualEncoder.from_pretrained(str(student)).save_pretrained(staged, AutoTokenizer.from_pretrained(str(student)),
                                                                  max_length=max_length)
    else:
        from td_ray.encoders.colbert import load_colbert

        model, tokenizer = load_colbert(student)
        model.save_pretrained(staged, tokenizer)
    (staged / "README.md").write_text(model_card(kind, fmt, lineage), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staged, out)
    logger.info("exported the %s student %s as %s into %s", kind, student, fmt, out)
    return out


def model_card(kind: str, fmt: str, lineage: dict[str, str]) -> str:
    """A Hugging Face model card: metadata for the hub, what the model is, how to load it, and its lineage.

    >>> print(model_card("dense", "sentence-transformers", {"td_ray.teacher": "t5"}).splitlines()[1])
    library_name: sentence-transformers
    """
    library = {"sentence-transformers": "sentence-transformers", "pylate": "PyLate", "plaid-x": "colbert"}[fmt]
    tags = ["td-ray", "translate-distill", "cross-language-retrieval"] + (["colbert", "plaid-x"] if kind == "colbert"
                                                                         else ["sentence-transformers"])
    usage = {
        "sentence-transformers": "from sentence_transformers import SentenceTransformer\n\n"
                                 "model = SentenceTransformer(\"path/to/this/folder\")\n"
                                 "vectors = model.encode([\"a query\", \"a passage\"])",
        "pylate": "from pylate import models\n\nmodel = models.ColBERT(\"path/to/this/folder\")\n"
                  "queries = model.encode([\"a query\"], is_query=True)",
        "plaid-x": "from colbert import Indexer\nfrom colbert.infra import ColBERTConfig\n\n"
                   "indexer = Indexer(checkpoint=\"path/to/this/folder\", config=ColBERTConfig(nbits=2))",
    }[fmt]
    rows = "\n".join(f"| {key.removeprefix('td_ray.')} | {str(value)[:200]} |" for key, value in sorted(lineage.items()))
    what = ("a single-vector dense retriever" if kind == "dense"
            else "a ColBERT-X late-interaction retriever (one vector per token)")
    return (f"---\nlibrary_name: {library}\ntags:\n" + "".join(f"- {tag}\n" for tag in tags)
            + ("pipeline_tag: sentence-similarity\n" if kind == "dense" else "")
            + f"---\n\n# td-ray student\n\n{what[0].upper() + what[1:]}, distilled by td-ray (Translate-Distill: "
            "Yang, Lawrie, Mayfield et al., 2024) from a teacher's scores of English training pairs, with the passages "
            f"machine-translated.\n\n## Use\n\n```python\n{usage}\n```\n\n## Lineage\n\n| | |\n|---|---|\n{rows}\n")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an exported folder to the hub repository `repo_id` (created private if absent), with the token in
    HF_TOKEN; returns the repository's URL."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ModelError("pushing to the hub needs a token with write access in the HF_TOKEN environment variable")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="td-ray export")
    return str(url)
