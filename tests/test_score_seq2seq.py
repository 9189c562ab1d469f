"""The monoT5-style seq2seq teacher: log P(true) over {true, false} at the first decoder step, on a tiny offline T5."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertConfig
from transformers.utils import HF_MODULES_CACHE

from td_ray.assets.build import COMPLETE_MARKER
from td_ray.assets.tiny_t5 import build_tiny_t5
from td_ray.score.core import token_budget_batches
from td_ray.score.seq2seq import (
    Seq2SeqTeacher,
    check_seq2seq_teacher,
    split_template,
)
from td_ray.errors import ModelError

MAX_LENGTH = 48
LONG_PASSAGE = " ".join(["Vikel gume zilok tumi bosek fozu vimes kude pesi."] * 12)
QUERIES = ["vikel gume", "zilok tumi bosek", "kude", "fozu vimes pesi", "", "gume zilok"]
PASSAGES = [
    "Vikel gume zilok tumi bosek fozu vimes kude pesi.",
    "Zilan zekol mafanek kudas voses kude tola sikal monamer zilok.",
    LONG_PASSAGE,
    "short",
    "Vikel gume.",
    "",
]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5") / "t5")


@pytest.fixture(scope="module")
def teacher(tiny_t5):
    return Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, device="cpu")


def _reference_scores(model_dir, queries, passages, true_piece, false_piece, max_length):
    """Each pair alone: the whole prompt tokenized, cut in the document so `Relevant:</s>` stays, one decoder step."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    true_id, false_id = tokenizer.convert_tokens_to_ids([true_piece, false_piece])
    tail = tokenizer.encode(" Relevant:", add_special_tokens=False)
    scores = []
    for query, passage in zip(queries, passages):
        ids = tokenizer.encode(f"Query: {query} Document: {passage} Relevant:", add_special_tokens=False)
        if len(ids) + 1 > max_length:
            ids = ids[: max_length - 1 - len(tail)] + tail
        ids.append(tokenizer.eos_token_id)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]])).logits
        scores.append(torch.log_softmax(logits[:, 0, [false_id, true_id]], dim=-1)[0, 1].item())
    return scores


@pytest.mark.parametrize("words", [("true", "false"), ("yes", "no")])
def test_score_is_first_step_log_probability_of_the_true_word(tiny_t5, words):
    true_word, false_word = words
    teacher = Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, true_word=true_word, false_word=false_word,
                             device="cpu")
    scores = teacher.score(QUERIES, PASSAGES)
    assert scores.dtype == np.float32 and scores.shape == (len(QUERIES),)
    expected = _reference_scores(tiny_t5, QUERIES, PASSAGES, f"▁{true_word}", f"▁{false_word}", MAX_LENGTH)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert len({round(value, 5) for value in expected}) == len(expected)  # the pairs really differ


def test_long_passage_is_cut_in_the_document_keeping_the_prompt_tail(teacher):
    full = teacher.tokenizer.encode(f"Query: {QUERIES[2]} Document: {LONG_PASSAGE} Relevant:")
    assert len(full) > MAX_LENGTH
    row = teacher.encode([QUERIES[2]], [LONG_PASSAGE])[0]
    assert len(row) == MAX_LENGTH
    assert row[-1] == teacher.tokenizer.eos_token_id
    assert teacher.tokenizer.decode(row, skip_special_tokens=True).endswith("Relevant:")
    assert teacher.tokenizer.decode(row).startswith("Query: kude Document: Vikel gume")


@pytest.mark.parametrize("budget", [1, 60, 150, 10**6])
def test_batching_by_length_keeps_input_order(teacher, budget):
    one_by_one = [teacher.score([query], [passage])[0] for query, passage in zip(QUERIES, PASSAGES)]
    assert teacher.score(QUERIES, PASSAGES, max_batch_tokens=budget).tolist() == pytest.approx(one_by_one, abs=1e-5)


def test_token_budget_batches_are_longest_first_and_within_budget():
    lengths = [5, 40, 12, 12, 3, 100, 7]
    batches = token_budget_batches(lengths, 48)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0] == [5]  # longer than the budget: alone
    assert all(len(batch) * lengths[batch[0]] <= 48 for batch in batches[1:])
    assert batches == [[5], [1], [2, 3, 6, 0], [4]]
    assert token_budget_batches([], 48) == []


def test_scores_are_log_probabilities_of_a_two_way_softmax(tiny_t5, teacher):
    scores = teacher.score(QUERIES, PASSAGES)
    assert (scores <= 0).all() and np.isfinite(scores).all()
    swapped = Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, true_word="false", false_word="true",
                             device="cpu")
    log_false = swapped.score(QUERIES, PASSAGES)
    assert (np.exp(scores) + np.exp(log_false)).tolist() == pytest.approx([1.0] * len(QUERIES), abs=1e-5)


def test_empty_input_and_mismatched_lengths(teacher):
    assert teacher.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        teacher.score(["a", "b"], ["c"])


@pytest.mark.parametrize("word", ["zzqx", "☃"])
def test_answer_word_that_is_not_one_token_is_refused(tiny_t5, word):
    with pytest.raises(ModelError, match=f"answer word '{word}' is not a single token of teacher '{tiny_t5}'"):
        Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, true_word=word)
    with pytest.raises(ModelError, match=f"answer word '{word}'"):
        check_seq2seq_teacher(str(tiny_t5), false_word=word)


def test_same_true_and_false_token_is_refused(tiny_t5):
    with pytest.raises(ModelError, match="same token"):
        check_seq2seq_teacher(str(tiny_t5), true_word="yes", false_word="yes")


def test_custom_template(tiny_t5, teacher):
    custom = Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, template="Question: {query} Passage: {document}",
                            device="cpu")
    row = custom.encode(["kude"], ["short"])[0]
    assert custom.tokenizer.decode(row, skip_special_tokens=True) == "Question: kude Passage: short"
    assert custom.score(QUERIES, PASSAGES).tolist() != pytest.approx(teacher.score(QUERIES, PASSAGES).tolist())


@pytest.mark.parametrize("template", ["Query: {query}", "{document} only", "{query} {document} {extra}",
                                      "{query} {document} {document}"])
def test_bad_template_is_refused(template):
    with pytest.raises(ValueError, match="must contain {query} and {document} once each"):
        split_template(template)


def test_bfloat16_scores_close_to_float32_and_float16_refused(tiny_t5, teacher):
    bf16 = Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, dtype="bfloat16", device="cpu")
    assert bf16.model.dtype == torch.bfloat16 and teacher.model.dtype == torch.float32
    scores = bf16.score(QUERIES, PASSAGES)
    assert scores.dtype == np.float32
    assert scores.tolist() == pytest.approx(teacher.score(QUERIES, PASSAGES).tolist(), abs=0.05)
    with pytest.raises(ValueError, match="float16"):
        Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH, dtype="float16")


def test_encoder_only_model_is_refused(tmp_path):
    BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'bert' model, not an encoder-decoder"):
        check_seq2seq_teacher(str(tmp_path))


def test_missing_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot be loaded"):
        check_seq2seq_teacher(str(tmp_path / "absent"))


def test_remote_code_runs_only_when_trusted(tiny_t5, teacher, tmp_path):
    """A model whose config needs its own code fails by default and loads once trust_remote_code is set."""
    custom = tmp_path / "td_ray_remote_code_t5"
    shutil.copytree(tiny_t5, custom)
    (custom / "configuration_custom_t5.py").write_text(
        "from transformers import T5Config\n\n\nclass CustomT5Config(T5Config):\n    model_type = 'td_ray_custom_t5'\n"
    )
    (custom / "modeling_custom_t5.py").write_text(
        "from transformers import T5ForConditionalGeneration\n\nfrom .configuration_custom_t5 import CustomT5Config\n"
        "\n\nclass CustomT5(T5ForConditionalGeneration):\n    config_class = CustomT5Config\n"
    )
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "td_ray_custom_t5"
    config["auto_map"] = {"AutoConfig": "configuration_custom_t5.CustomT5Config",
                          "AutoModelForSeq2SeqLM": "modeling_custom_t5.CustomT5"}
    (custom / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError, match="trust_remote_code"):
        Seq2SeqTeacher(str(custom), max_length=MAX_LENGTH)
    try:
        trusted = Seq2SeqTeacher(str(custom), max_length=MAX_LENGTH, trust_remote_code=True, device="cpu")
    finally:  # transformers copies the trusted code into its modules cache: take it out again
        shutil.rmtree(Path(HF_MODULES_CACHE) / "transformers_modules" / custom.name, ignore_errors=True)
    assert type(trusted.model).__name__ == "CustomT5"
    assert trusted.score(QUERIES, PASSAGES).tolist() == pytest.approx(teacher.score(QUERIES, PASSAGES).tolist(),
                                                                      abs=1e-6)


def test_tiny_t5_is_cached_and_rebuilt_when_the_key_changes(tmp_path):
    out = tmp_path / "t5"
    build_tiny_t5(out, seed=0)
    marker = (out / COMPLETE_MARKER).stat()
    weights = (out / "model.safetensors").read_bytes()
    build_tiny_t5(out, seed=0)
    assert (out / COMPLETE_MARKER).stat().st_ino == marker.st_ino  # not rebuilt
    build_tiny_t5(out, seed=1)
    assert json.loads((out / COMPLETE_MARKER).read_text())["seed"] == 1
    assert (out / "model.safetensors").read_bytes() != weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    tokenizer = AutoTokenizer.from_pretrained(out)
    for word in ("true", "false", "yes", "no"):
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(word, add_special_tokens=False)) == [f"▁{word}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_device_and_dtype_are_cuda_and_bfloat16_on_a_gpu(tiny_t5, teacher):
    gpu = Seq2SeqTeacher(str(tiny_t5), max_length=MAX_LENGTH)
    assert gpu.device == "cuda" and gpu.model.dtype == torch.bfloat16
    assert gpu.score(QUERIES, PASSAGES).tolist() == pytest.approx(teacher.score(QUERIES, PASSAGES).tolist(), abs=0.05)
