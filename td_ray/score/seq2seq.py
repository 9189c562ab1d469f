"""A monoT5-style sequence-to-sequence reranker as the teacher (Nogueira, Jiang, Pradeep and Lin, "Document
Ranking with a Pretrained Sequence-to-Sequence Model", Findings of EMNLP 2020).

Inputs: (query, passage) text pairs. Each pair is rendered as ``Query: {query} Document: {document} Relevant:``,
the encoder reads it, the decoder takes one step from its start token, and the score is
``log_softmax([logit(false_word), logit(true_word)])[1]``: log P(true) over the two answer words. Scores are
stored raw (log-probabilities in (-inf, 0]), never squashed, like the cross-encoder's logits.

Translate-Distill's teachers are of this kind: castorini/monot5-3b-msmarco-10k answers ``true``/``false``
(the defaults) and unicamp-dl/mt5-13b-mmarco-100k answers ``yes``/``no``.

Only the document is truncated, so every input still ends with the template's tail (``Relevant:``) and the
end-of-sequence token; pygaggle truncates the whole string instead, which drops that cue from long passages.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from td_ray import devices
from td_ray.config import split_template
from td_ray.errors import ModelError
from td_ray.score.core import padded, score_in_budget

logger = logging.getLogger(__name__)

MONOT5_TEMPLATE = "Query: {query} Document: {document} Relevant:"
_DTYPES = ("auto", "float32", "bfloat16")


def resolve_word_id(tokenizer: Any, word: str, model: str) -> int:
    """The token id of an answer word: encoding it without special tokens must give exactly one known token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ModelError(
            f"answer word {word!r} is not a single token of teacher {model!r} (it encodes to "
            f"{tokenizer.convert_ids_to_tokens(ids)}); use the words the model was trained to answer with "
            "(monoT5: true/false, mMARCO mT5: yes/no)"
        )
    return ids[0]


def _load_config(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = ("; it needs its own code: set trust_remote_code only if you trust that code"
                if not trust_remote_code and "trust_remote_code" in str(error) else "")
        raise ModelError(f"seq2seq teacher {model!r} cannot be loaded ({error}){hint}") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"teacher {model!r} is a {config.model_type!r} model, not an encoder-decoder; a seq2seq "
                         "teacher must be a T5-style model such as castorini/monot5-3b-msmarco-10k")
    return config


def _load_tokenizer(model: str, revision: str | None, trust_remote_code: bool, true_word: str,
                    false_word: str) -> tuple[Any, int, int]:
    """The teacher's tokenizer and the ids of its true and false answer words."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    true_id, false_id = (resolve_word_id(tokenizer, word, model) for word in (true_word, false_word))
    if true_id == false_id:
        raise ModelError(f"true word {true_word!r} and false word {false_word!r} are the same token of teacher "
                         f"{model!r}; the score would be constant")
    return tokenizer, true_id, false_id


def check_seq2seq_teacher(model: str, *, revision: str | None = None, trust_remote_code: bool = False,
                          true_word: str = "true", false_word: str = "false") -> None:
    """Fail fast, on the driver and without the weights, if `model` cannot serve as a seq2seq teacher."""
    _load_config(model, revision, trust_remote_code)
    _load_tokenizer(model, revision, trust_remote_code, true_word, false_word)


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one sequence (T5: none, then ``</s>``)."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ModelError(f"tokenizer {tokenizer.name_or_path!r} changes the text's tokens when it adds special tokens")


class Seq2SeqPairs:
    """The seq2seq teacher's tokenizer and template alone: (query, passage) texts to token ids, on a CPU."""

    def __init__(self, model: str, *, max_length: int, revision: str | None = None, trust_remote_code: bool = False,
                 true_word: str = "true", false_word: str = "false", template: str = MONOT5_TEMPLATE):
        self.before, self.after = split_template(template)
        self.tokenizer, self.true_id, self.false_id = _load_tokenizer(model, revision, trust_remote_code, true_word,
                                                                      false_word)
        self.prefix, self.suffix = _special_frame(self.tokenizer)
        if max_length <= len(self.prefix) + len(self.suffix):
            raise ValueError(f"teacher max_length {max_length} leaves no room for text")
        self.max_length = max_length

    def encode(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """`input_ids` of each rendered pair, with special tokens; documents cut so the whole fits max_length."""
        if not queries:
            return {"input_ids": []}
        heads = [self.before.format(query=query) for query in queries]
        tails = [self.after.format(query=query) for query in queries]
        encode = self.tokenizer(heads + list(passages) + tails, add_special_tokens=False)["input_ids"]
        n = len(queries)
        room = self.max_length - len(self.prefix) - len(self.suffix)
        rows = []
        for head, document, tail in zip(encode[:n], encode[n : 2 * n], encode[2 * n :]):
            # The head (query) is cut too if it alone leaves no room, so the tail always survives.
            rows.append([*self.prefix, *(head + document)[: max(0, room - len(tail))], *tail[:room], *self.suffix])
        return {"input_ids": rows}


class Seq2SeqTeacher:
    """An AutoModelForSeq2SeqLM scoring pairs by log P(true word) at the first decoder step, in eval mode: on the GPU
    its Ray worker reserved (`device: auto`) in bf16 (`dtype: auto`), else in fp32 on the reserved CPUs. The weights
    are read straight onto that device in that dtype (no full copy in host RAM)."""

    def __init__(self, model: str, *, max_length: int, revision: str | None = None, trust_remote_code: bool = False,
                 true_word: str = "true", false_word: str = "false", template: str = MONOT5_TEMPLATE,
                 device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        if dtype not in _DTYPES:
            raise ValueError(f"teacher dtype {dtype!r} is not one of {_DTYPES} (float16 overflows in T5 models)")
        config = _load_config(model, revision, trust_remote_code)
        self.pairs = Seq2SeqPairs(model, max_length=max_length, revision=revision,
                                  trust_remote_code=trust_remote_code, true_word=true_word, false_word=false_word,
                                  template=template)
        self.tokenizer, self.true_id, self.false_id = self.pairs.tokenizer, self.pairs.true_id, self.pairs.false_id
        self.device = devices.resolve_device(device)
        devices.use_reserved_threads()
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.model = AutoModelForSeq2SeqLM.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype),
            device_map=self.device,
        ).eval()
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = self.model.generation_config.decoder_start_token_id
        if start is None:
            raise ModelError(f"teacher {model!r} defines no decoder_start_token_id")
        self.decoder_start_token_id = int(start)
        self.model_seconds = 0.0  # of the last `score_encoded`
        logger.info("seq2seq teacher %s on %s (%s): true=%r (%d), false=%r (%d)", model, self.device, dtype,
                    true_word, self.true_id, false_word, self.false_id)

    def encode(self, queries: list[str], passages: list[str]) -> list[list[int]]:
        """Token ids of each rendered pair (`Seq2SeqPairs.encode`)."""
        return self.pairs.encode(queries, passages)["input_ids"]

    def score(self, queries: list[str], passages: list[str], max_batch_tokens: int | None = None) -> np.ndarray:
        """log P(true) over {true, false} for each (query, passage) pair, as float32 in input order."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        return self.score_encoded(self.pairs.encode(queries, passages), max_batch_tokens)

    def score_encoded(self, encoded: dict[str, list[list[int]]], max_batch_tokens: int | None = None) -> np.ndarray:
        """Scores of pairs `Seq2SeqPairs.encode` made, in their order (see `score_in_budget`)."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # masked out anyway

        def inputs(batch: list[int]) -> dict:
            ids, mask = padded([encoded["input_ids"][i] for i in batch], pad)
            start = torch.full((len(batch), 1), self.decoder_start_token_id, dtype=torch.long)
            return {"input_ids": ids.to(self.device, non_blocking=True),
                    "attention_mask": mask.to(self.device, non_blocking=True),
                    "decoder_input_ids": start.to(self.device, non_blocking=True)}

        def forward(batch_inputs: dict):
            pair = self.model(**batch_inputs).logits[:, 0, [self.false_id, self.true_id]].float()
            return torch.log_softmax(pair, dim=-1)[:, 1]

        scores, self.model_seconds = score_in_budget(encoded["input_ids"], max_batch_tokens, inputs, forward)
        return scores
