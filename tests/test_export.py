"""A trained student outside td-ray: sentence-transformers loads the dense student (saved, registered and exported)
with td-ray's vectors; ColBERT-X students export in the PLAID-X layout, also from an older td-ray's layout."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from td_ray.cli import main
from td_ray.encoders.dense import StudentEncoder
from td_ray.workspace import STUDENT_DIR, Workspace

TEXTS = ["balto mirek dusa", "fobe kanu lete rima sote", "a sentence that is longer than the others by some words"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_trained_dense_student_loads_in_sentence_transformers_with_td_rays_vectors(pipeline_run, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    config, _ = pipeline_run
    student = Workspace(config.workspace).path(STUDENT_DIR)
    ours = StudentEncoder(student).encode(TEXTS)
    theirs = SentenceTransformer(student, device="cpu").encode(TEXTS)
    assert np.all(_cosines(ours, theirs) > 1 - 1e-5)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)  # mean pooling and dot: the same vectors

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    model = f"models:/{config.mlflow.registered_model}@{config.mlflow.alias}"
    out = tmp_path / "exported"
    assert main(["export", "--model", model, "--format", "sentence-transformers", "--out", str(out),
                 "--config", str(path)]) == 0
    exported = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    assert np.all(_cosines(ours, exported) > 1 - 1e-5)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n") and "| teacher |" in card
    assert main(["export", "--model", model, "--format", "plaid-x", "--out", str(tmp_path / "no"),
                 "--config", str(path)]) == 2
    assert "is a dense student, which the plaid-x format cannot hold; use sentence-transformers" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_a_colbert_student_of_the_older_layout_exports_in_the_plaid_x_layout_with_the_same_vectors(assets_root,
                                                                                                  tmp_path):
    from safetensors.torch import save_file

    from td_ray.encoders.colbert import ColBERTStudentEncoder, load_colbert
    from td_ray.encoders.spec import ColBERTSpec

    torch.manual_seed(0)
    model, tokenizer = load_colbert(assets_root / "tiny-models" / "student", ColBERTSpec(dim=16, doc_maxlen=32))
    older = tmp_path / "older"  # td-ray's layout before PLAID-X's: a bare backbone, the projection and spec apart
    model.encoder.save_pretrained(older)
    tokenizer.hf.save_pretrained(older)
    save_file({"weight": model.linear.weight.detach().contiguous()}, str(older / "colbert_linear.safetensors"))
    (older / "td_ray_colbert.json").write_text(json.dumps(dataclasses.asdict(tokenizer.spec)))

    out = tmp_path / "plaidx"
    assert main(["export", "--model", str(older), "--format", "plaid-x", "--out", str(out)]) == 0
    assert (out / "artifact.metadata").is_file() and not (out / "colbert_linear.safetensors").exists()
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: colbert\n")
    before, after = ColBERTStudentEncoder(older), ColBERTStudentEncoder(out)
    np.testing.assert_allclose(after.encode_queries(TEXTS), before.encode_queries(TEXTS), rtol=0, atol=1e-6)
    for a, b in zip(after.encode_documents(TEXTS), before.encode_documents(TEXTS)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_an_export_of_a_missing_model_names_the_fix(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--format", "pylate", "--out", str(tmp_path / "o")]) == 2
    assert "no such directory; name a student directory or a registered models:/NAME@ALIAS" in capsys.readouterr().err


def test_pushing_to_the_hub_without_a_token_says_what_is_needed(tmp_path, monkeypatch):
    from td_ray.encoders.export import push_to_hub
    from td_ray.errors import ModelError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelError, match="needs a token with write access in the HF_TOKEN environment variable"):
        push_to_hub(tmp_path, "someone/student")
