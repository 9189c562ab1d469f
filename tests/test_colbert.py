"""The ColBERT-X student: MaxSim, query augmentation, document masks, save/load and one training step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from td_ray.encoders.colbert import ColBERTStudentEncoder, load_colbert, maxsim, score
from td_ray.encoders.spec import COLBERT_SPEC_FILE, ColBERTSpec, is_colbert
from td_ray.distill.losses import KLDistillationLoss

QUERIES = ["bright river stone", "quiet mountain lake"]
PASSAGES = [
    ["the bright stone lies by the river.", "a mountain far away", "nothing here at all"],
    ["the lake is quiet in the mountain.", "river stones are bright", "an empty field"],
]


@pytest.fixture(scope="module")
def student_dir(assets_root):
    """The tiny BERT student (no [unused0]/[unused1] in its vocabulary), built once per session."""
    return assets_root / "tiny-models" / "student"


def fresh(student_dir, **spec):
    torch.manual_seed(0)
    model, tokenizer = load_colbert(student_dir, ColBERTSpec(**spec))
    return model.eval(), tokenizer


def brute_force_maxsim(q, q_mask, d, d_mask):
    """[B, n] by plain loops over queries, documents and tokens."""
    batch, n = d.shape[:2]
    out = np.zeros((batch, n))
    for b in range(batch):
        for j in range(n):
            total = 0.0
            for i in range(q.shape[1]):
                if not q_mask[b, i]:
                    continue
                total += max(float(q[b, i] @ d[b, j, k]) for k in range(d.shape[2]) if d_mask[b, j, k])
            out[b, j] = total
    return out


def test_maxsim_equals_brute_force_and_masked_tokens_never_win():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=generator)
    d = torch.randn(2, 3, 5, 8, generator=generator)
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    d_mask = torch.rand(2, 3, 5, generator=generator) > 0.3
    d_mask[..., 0] = True
    d[0, 1, 4] = q[0, 0] * 10  # would win the max for query token 0 ...
    d_mask[0, 1, 4] = False  # ... but it is masked
    expected = brute_force_maxsim(q.numpy(), q_mask.numpy(), d.numpy(), d_mask.numpy())

    grouped = maxsim(q, q_mask, d, d_mask)
    flat = maxsim(q, q_mask, d.reshape(6, 5, 8), d_mask.reshape(6, 5))
    assert grouped.shape == (2, 3)
    np.testing.assert_allclose(grouped.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat.numpy(), expected, rtol=1e-5, atol=1e-5)
    unmasked = maxsim(q, q_mask, d, torch.ones_like(d_mask))
    assert unmasked[0, 1] > grouped[0, 1] + 5  # the planted token wins once unmasked


def test_shape_errors_name_the_problem_and_the_fix(student_dir):
    with pytest.raises(ValueError, match=r"7 documents for 2 queries.*same number of documents \(nway\)"):
        maxsim(torch.zeros(2, 4, 8), torch.ones(2, 4), torch.zeros(7, 5, 8), torch.ones(7, 5))
    model, tokenizer = fresh(student_dir, dim=16)
    with pytest.raises(ValueError, match=r"query 0 has 3 passages but query 1 has 2.*distill.nway"):
        score(model, tokenizer, QUERIES, [PASSAGES[0], PASSAGES[1][:2]])
    with pytest.raises(ValueError, match="2 queries but 1 passage lists"):
        score(model, tokenizer, QUERIES, PASSAGES[:1])
    plain = tokenizer.hf(QUERIES, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="no scoring_mask: tokenize with ColBERTTokenizer"):
        model(dict(plain), dict(plain))


def test_queries_are_padded_with_mask_tokens_that_score_and_depend_on_the_query(student_dir):
    model, tokenizer = fresh(student_dir, dim=16)
    hf = tokenizer.hf
    # The tiny vocabulary has no [unused0]/[unused1]: they are added after it and the embeddings grow.
    assert (tokenizer.query_marker_id, tokenizer.doc_marker_id) == (len(hf) - 2, len(hf) - 1)
    assert model.encoder.get_input_embeddings().num_embeddings == len(hf)

    long_query = " ".join(["stone"] * 40)
    batch = tokenizer.queries([QUERIES[0], "a", long_query])
    ids = batch["input_ids"]
    assert ids.shape == (3, 32)
    assert ids[:, 0].tolist() == [hf.cls_token_id] * 3 and ids[:, 1].tolist() == [tokenizer.query_marker_id] * 3
    words = hf(QUERIES[0], add_special_tokens=False)["input_ids"]
    assert len(words) < 29  # leaves room for [MASK] padding
    assert ids[0, 2:2 + len(words)].tolist() == words and ids[0, 2 + len(words)] == hf.sep_token_id
    assert (ids[0, 3 + len(words):] == hf.mask_token_id).all()
    assert ids[2, -1] == hf.sep_token_id and not (ids[2] == hf.mask_token_id).any()  # truncated, no room left
    assert batch["scoring_mask"].all()  # every position, [MASK] included, takes part in MaxSim
    masks = ids == hf.mask_token_id
    assert (batch["attention_mask"][masks] == 0).all()  # PLAID-X default: the query does not attend to them

    with torch.no_grad():
        vectors = model.encode(**batch)
    mask_a, mask_b = vectors[0, -1], vectors[1, -1]  # [MASK] at the same position after different queries
    assert mask_a.norm() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(mask_a, mask_b, atol=1e-3)

    attending, attending_tokenizer = fresh(student_dir, dim=16, attend_to_mask_tokens=True)
    attended = attending_tokenizer.queries([QUERIES[0]])
    assert (attended["attention_mask"] == 1).all()
    with torch.no_grad():
        changed = attending.encode(**attended)[0, 1]  # the [Q] marker now sees the [MASK] tokens
    assert not torch.allclose(changed, vectors[0, 1], atol=1e-4)


def test_documents_have_marker_and_padding_and_punctuation_out_of_maxsim(student_dir):
    model, tokenizer = fresh(student_dir, dim=16, doc_maxlen=64)
    batch = tokenizer.documents(["a b", PASSAGES[0][0]])
    ids, scoring = batch["input_ids"], batch["scoring_mask"]
    assert ids[:, 1].tolist() == [tokenizer.doc_marker_id] * 2
    pads = ids == tokenizer.hf.pad_token_id
    assert pads[0].any() and not scoring[pads].any()
    assert scoring[~pads].all()  # punctuation scores unless the spec masks it
    with torch.no_grad():
        vectors = model.encode(**batch)
    assert (vectors[pads] == 0).all()

    _, punct_tokenizer = fresh(student_dir, dim=16, doc_maxlen=64, mask_punctuation=True)
    masked = punct_tokenizer.documents([PASSAGES[0][0]])
    period = masked["input_ids"][0] == punct_tokenizer.hf.convert_tokens_to_ids(".")
    assert period.sum() == 1 and not masked["scoring_mask"][0][period].any()
    assert masked["scoring_mask"][0][~period].all()


def test_vectors_are_unit_length_with_the_configured_dim(student_dir, tmp_path):
    for dim in (128, 24):
        model, tokenizer = fresh(student_dir, dim=dim)
        model.save_pretrained(tmp_path / str(dim), tokenizer)
        encoder = ColBERTStudentEncoder(tmp_path / str(dim), max_length=16, batch_size=2)
        documents = encoder.encode_documents(["a b", PASSAGES[0][0], " ".join(["stone"] * 40)])
        lengths = [int(row.sum()) for row in tokenizer.documents(["a b", PASSAGES[0][0]], 16)["scoring_mask"]]
        assert [doc.shape for doc in documents] == [(lengths[0], dim), (lengths[1], dim), (16, dim)]
        for doc in documents:
            np.testing.assert_allclose(np.linalg.norm(doc, axis=1), 1.0, atol=1e-5)
        queries = encoder.encode_queries(QUERIES)
        assert queries.shape == (2, 32, dim) and queries.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(queries, axis=2), 1.0, atol=1e-5)


def test_save_then_load_gives_identical_scores(student_dir, tmp_path):
    spec = {"dim": 32, "query_maxlen": 16, "doc_maxlen": 48, "attend_to_mask_tokens": True}
    model, tokenizer = fresh(student_dir, **spec)
    with torch.no_grad():
        before = score(model, tokenizer, QUERIES, PASSAGES)
    model.save_pretrained(tmp_path / "colbert", tokenizer)
    assert is_colbert(tmp_path / "colbert") and not is_colbert(student_dir)

    loaded, loaded_tokenizer = load_colbert(tmp_path / "colbert")
    assert loaded_tokenizer.spec == ColBERTSpec(**spec)
    with torch.no_grad():
        after = score(loaded.eval(), loaded_tokenizer, QUERIES, PASSAGES)
    assert before.shape == (2, 3)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="projects 64 to 32 dims, but dim=128 was asked"):
        load_colbert(tmp_path / "colbert", ColBERTSpec())
    (tmp_path / "colbert" / COLBERT_SPEC_FILE).write_text('{"dim": 32, "pooling": "cls"}')
    with pytest.raises(ValueError, match="does not describe a ColBERT student"):
        load_colbert(tmp_path / "colbert")


def _plaidx_hf_colbert(dim: int):
    """HF_ColBERT as PLAID-X 0.3.3's class_factory defines it (colbert/modeling/hf_colbert.py): a bias-free `linear`
    projection, and the backbone, pooler included, under the model type's prefix."""
    from transformers import BertModel, BertPreTrainedModel

    class HF_ColBERT(BertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(config.hidden_size, dim, bias=False)
            setattr(self, self.base_model_prefix, BertModel(config))
            self.post_init()

    return HF_ColBERT


def test_students_are_saved_in_the_plaid_x_layout_and_plaid_x_checkpoints_load_with_the_same_vectors(student_dir,
                                                                                                     tmp_path):
    import json

    from safetensors import safe_open

    spec = ColBERTSpec(dim=32, query_maxlen=16, doc_maxlen=48)
    model, tokenizer = fresh(student_dir, dim=32, query_maxlen=16, doc_maxlen=48)
    model.save_pretrained(tmp_path / "td", tokenizer)
    with safe_open(str(tmp_path / "td" / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
    assert "linear.weight" in keys and all(key.startswith("bert.") for key in keys - {"linear.weight"})
    assert json.loads((tmp_path / "td" / "config.json").read_text())["architectures"] == ["HF_ColBERT"]
    metadata = json.loads((tmp_path / "td" / "artifact.metadata").read_text())
    assert {key: metadata[key] for key in ("dim", "query_maxlen", "doc_maxlen", "query_token_id", "doc_token_id")} == {
        "dim": 32, "query_maxlen": 16, "doc_maxlen": 48, "query_token_id": "[unused0]", "doc_token_id": "[unused1]"}
    assert metadata["model_name"] == str(student_dir)  # PLAID-X builds its model class from what training started from

    plaid, loading = _plaidx_hf_colbert(32).from_pretrained(tmp_path / "td", output_loading_info=True)
    assert not loading["unexpected_keys"]  # PLAID-X finds every weight; only the pooler, which ColBERT never uses,
    assert {key.split(".")[1] for key in loading["missing_keys"]} <= {"pooler"}  # starts fresh
    inputs = tokenizer.documents([text for group in PASSAGES for text in group])
    with torch.no_grad():
        ours = model.encode(**inputs)
        hidden = plaid.eval().bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        theirs = torch.nn.functional.normalize(plaid.linear(hidden.last_hidden_state), dim=-1)
    mask = inputs["scoring_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-5)

    released = tmp_path / "plaidx"  # as PLAID-X saves a checkpoint: pytorch_model.bin, its metadata, its defaults
    plaid.config.save_pretrained(released)
    torch.save(plaid.state_dict(), released / "pytorch_model.bin")
    tokenizer.hf.save_pretrained(released)
    (released / "artifact.metadata").write_text(json.dumps({"dim": 32, "query_maxlen": 16, "doc_maxlen": 48}))
    assert is_colbert(released)
    loaded, loaded_tokenizer = load_colbert(released)
    assert loaded_tokenizer.spec == ColBERTSpec(dim=32, query_maxlen=16, doc_maxlen=48, mask_punctuation=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode(**inputs)[mask], ours[mask], rtol=0, atol=1e-5)
    assert spec == ColBERTSpec.load(tmp_path / "td")


def test_a_kl_gradient_step_lowers_the_loss(student_dir):
    model, tokenizer = fresh(student_dir, query_maxlen=12, doc_maxlen=32)
    teacher = torch.tensor([[5.0, 1.0, 0.0], [4.0, 2.0, -1.0]])
    loss_fn = KLDistillationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        return loss_fn(score(model, tokenizer, QUERIES, PASSAGES), teacher)

    with torch.no_grad():
        start = loss().item()
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        assert model.linear.weight.grad is not None and model.linear.weight.grad.abs().sum() > 0
        optimizer.step()
    model.eval()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.5 * start, (start, end)


def test_a_registered_colbert_student_gives_its_token_vectors_back(student_dir, tmp_path, monkeypatch):
    import mlflow

    from td_ray.encoders.colbert import ColBERTStudentEncoder
    from td_ray.distill.registry import register_student

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    model, tokenizer = fresh(student_dir, dim=16, query_maxlen=8)
    model.save_pretrained(tmp_path / "colbert", tokenizer)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run():
        version = register_student(tmp_path / "colbert", "colbert-student", "candidate", {"td_ray.student_kind": "colbert"})
    loaded = mlflow.pyfunc.load_model("models:/colbert-student@candidate")
    direct = ColBERTStudentEncoder(tmp_path / "colbert")
    queries = loaded.predict(["bright stone river", "lake"])
    assert queries.shape == (2, 8, 16)
    np.testing.assert_allclose(queries, direct.encode_queries(["bright stone river", "lake"]), atol=1e-5)
    documents = loaded.predict(PASSAGES[0], params={"side": "document"})
    for row, expected in zip(documents, direct.encode_documents(PASSAGES[0])):
        np.testing.assert_allclose(row[:len(expected)], expected, atol=1e-5)
        assert not row[len(expected):].any()  # zero padding after the document's own tokens
    tags = mlflow.MlflowClient().get_model_version("colbert-student", version).tags
    assert tags["td_ray.student_kind"] == "colbert"
