"""The ColBERT-X student: one vector per token, scored by late interaction (MaxSim).

Khattab & Zaharia, "ColBERT", SIGIR 2020; Nair et al., "Transfer Learning Approaches for Building
Cross-Language Dense Retrieval Models" (ColBERT-X), ECIR 2022. Tokenization, projection and scoring follow
PLAID-X 0.3.1 (hltcoe/ColBERT-X, branch plaid-x), the code that trained the Translate-Distill students:

- queries are ``[CLS] [Q] query [SEP]`` padded with ``[MASK]`` to exactly ``query_maxlen``; every position,
  the ``[MASK]`` ones included, takes part in MaxSim. By default (``attend_to_mask_tokens=False``, as in
  PLAID-X) the ``[MASK]`` positions attend to the query but the query's tokens do not attend to them;
- documents are ``[CLS] [D] document [SEP]`` padded to the longest in the batch; padding never scores;
- ``[Q]`` and ``[D]`` are the tokens ``[unused0]`` and ``[unused1]``; a vocabulary without them (XLM-R, or
  td-ray's tiny student) gets them added, in that order, and the embeddings grow to match, as PLAID-X does;
- a bias-free linear layer projects each token to ``dim`` (128) and the vectors are L2-normalised.

Swapped in for :class:`td_ray.encoders.dense.DualEncoder`: ``ColBERTEncoder.forward`` takes the same
(query, passages) batches and returns the same [batch, nway] scores, but the batches must come from
:class:`ColBERTTokenizer` (or :func:`score`, which tokenizes and calls the model, DDP-wrapped or not).
"""
from __future__ import annotations

import copy
import json
import logging
import string
from pathlib import Path

import numpy as np
import torch
from torch import nn

from td_ray import devices
from td_ray.encoders.buckets import is_bucketed, pad_length
from td_ray.encoders.dense import load_encoder
from td_ray.encoders.spec import PLAIDX_METADATA, ColBERTSpec

logger = logging.getLogger(__name__)

PROJECTION_KEY = "linear.weight"
"""The projection to ``dim`` ([dim, hidden]) in a PLAID-X checkpoint, beside the backbone's weights."""
PROJECTION_FILE = "colbert_linear.safetensors"
"""Where students saved before the PLAID-X layout kept their projection (still read)."""
MASKED_SIMILARITY = -9999.0
"""Similarity given to masked document tokens before the max (PLAID-X's value; cosines are >= -1)."""
_WORD_START_PREFIXES = ("", "\u2581", "\u0120")
"""Word-start spellings a punctuation token can have: plain (WordPiece), sentencepiece, byte-level BPE."""


def _to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


class ColBERTTokenizer:
    """Texts to ColBERT inputs: ``input_ids``, ``attention_mask`` and ``scoring_mask`` (the tokens MaxSim uses)."""

    def __init__(self, tokenizer, spec: ColBERTSpec):
        self.hf, self.spec = tokenizer, spec
        missing = [marker for marker in (spec.query_marker, spec.doc_marker) if marker not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing)
            logger.info("added ColBERT marker tokens %s to the vocabulary (now %d tokens)", missing, len(tokenizer))
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the student's tokenizer has no {name[:-9]} token, which ColBERT needs; "
                                 "start from a BERT- or XLM-R-style model")
        self.query_marker_id = tokenizer.convert_tokens_to_ids(spec.query_marker)
        self.doc_marker_id = tokenizer.convert_tokens_to_ids(spec.doc_marker)
        self.skip_ids = torch.tensor(sorted(self._punctuation_ids()) if spec.mask_punctuation else [], dtype=torch.long)

    @classmethod
    def from_pretrained(cls, model: str | Path, spec: ColBERTSpec | None = None) -> ColBERTTokenizer:
        """The model's tokenizer; `spec` defaults to the one saved with the model, else ColBERT-X's defaults."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model)), spec or ColBERTSpec.load(model) or ColBERTSpec())

    def __len__(self) -> int:
        return len(self.hf)

    def _punctuation_ids(self) -> set[int]:
        """Vocabulary ids of the ASCII punctuation marks, in each word-start spelling the vocabulary has.

        PLAID-X takes the first id of each mark's encoding instead; for XLM-R that is often the bare word-start
        piece, so it masks that piece and keeps the marks. Looking the marks up avoids both.
        """
        vocab = self.hf.get_vocab()
        return {vocab[prefix + mark] for mark in string.punctuation for prefix in _WORD_START_PREFIXES
                if prefix + mark in vocab}

    def _token_ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]

    def _frame(self, texts: list[str], marker_id: int, max_length: int, width: int | None, fill_id: int):
        ids = self._token_ids(texts, max_length - 3)
        rows = [[self.hf.cls_token_id, marker_id, *tokens, self.hf.sep_token_id] for tokens in ids]
        width = width or max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), width), fill_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, :len(row)] = torch.tensor(row)
            attention_mask[index, :len(row)] = 1
        return input_ids, attention_mask

    def queries(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``[CLS] [Q] query [SEP] [MASK]...``, exactly query_maxlen long (query augmentation)."""
        input_ids, attention_mask = self._frame(texts, self.query_marker_id, self.spec.query_maxlen,
                                                self.spec.query_maxlen, self.hf.mask_token_id)
        if self.spec.attend_to_mask_tokens:
            attention_mask = torch.ones_like(attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "scoring_mask": torch.ones_like(input_ids, dtype=torch.bool)}

    def documents(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``[CLS] [D] document [SEP] [PAD]...``, at most `max_length` (default doc_maxlen) tokens."""
        max_length = max_length or self.spec.doc_maxlen
        if max_length < 4:
            raise ValueError(f"ColBERT documents need max_length >= 4, got {max_length}")
        input_ids, attention_mask = self._frame(texts, self.doc_marker_id, max_length, None, self.hf.pad_token_id)
        scoring_mask = attention_mask.bool() & ~torch.isin(input_ids, self.skip_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "scoring_mask": scoring_mask}


def maxsim(query_vectors: torch.Tensor, query_mask: torch.Tensor,
           doc_vectors: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
    """Late-interaction scores [B, n]: per query and document, the sum over the query's unmasked tokens of the
    best dot product with any unmasked document token.

    query_vectors [B, Lq, d] with query_mask [B, Lq]; doc_vectors either [B, n, Ld, d] with doc_mask [B, n, Ld],
    or [B * n, Ld, d] with doc_mask [B * n, Ld] grouped query by query (each query's n documents in a row).
    With B = 1 and 3-D documents, one query is scored against every document (reranking).
    """
    if query_vectors.dim() != 3 or query_mask.shape != query_vectors.shape[:2]:
        raise ValueError(f"query vectors {tuple(query_vectors.shape)} must be [B, Lq, d] with a [B, Lq] mask, "
                         f"got mask {tuple(query_mask.shape)}")
    batch = query_vectors.shape[0]
    if doc_vectors.dim() == 3:
        if batch == 0 or doc_vectors.shape[0] % batch:
            raise ValueError(f"got {doc_vectors.shape[0]} documents for {batch} queries; pass the same number of "
                             "documents (nway) for every query, grouped query by query")
        doc_vectors = doc_vectors.reshape(batch, -1, *doc_vectors.shape[1:])
        doc_mask = doc_mask.reshape(batch, -1, doc_mask.shape[-1])
    if doc_vectors.dim() != 4 or doc_vectors.shape[0] != batch or doc_vectors.shape[-1] != query_vectors.shape[-1]:
        raise ValueError(f"document vectors {tuple(doc_vectors.shape)} must be [B, n, Ld, d] or [B * n, Ld, d] "
                         f"for query vectors {tuple(query_vectors.shape)}")
    if doc_mask.shape != doc_vectors.shape[:3]:
        raise ValueError(f"document mask {tuple(doc_mask.shape)} must match document vectors "
                         f"{tuple(doc_vectors.shape)} without their last dimension")
    similarity = torch.einsum("bqd,bnkd->bnqk", query_vectors, doc_vectors.to(query_vectors.dtype))
    similarity = similarity.masked_fill(~doc_mask.bool()[:, :, None, :], MASKED_SIMILARITY)
    best = similarity.max(dim=-1).values
    return (best * query_mask[:, None, :].to(best.dtype)).sum(-1)


class ColBERTEncoder(nn.Module):
    """A transformer and a bias-free projection to `dim`: one L2-normalised vector per token."""

    def __init__(self, encoder: nn.Module, dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.linear = nn.Linear(encoder.config.hidden_size, dim, bias=False)
        self.base_model: str | None = None
        """The model training started from (a hub id or directory): PLAID-X builds its model class from it."""
        nn.init.normal_(self.linear.weight, std=getattr(encoder.config, "initializer_range", 0.02))

    @property
    def dim(self) -> int:
        return self.linear.out_features

    @classmethod
    def from_pretrained(cls, model: str | Path, tokenizer: ColBERTTokenizer) -> ColBERTEncoder:
        """A saved ColBERT student, or a fresh projection on any HF encoder (embeddings grown for the markers)."""
        encoder = load_encoder(str(model))
        rows = encoder.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            encoder.resize_token_embeddings(len(tokenizer))
            logger.info("resized the student's embeddings from %d to %d tokens for the ColBERT markers",
                        rows, len(tokenizer))
        colbert = cls(encoder, tokenizer.spec.dim)
        colbert.base_model = base_model(Path(model)) or str(model)
        found = saved_projection(Path(model))
        if found is not None:
            path, weight = found
            if weight.shape != colbert.linear.weight.shape:
                raise ValueError(f"{path} projects {weight.shape[1]} to {weight.shape[0]} dims, but dim="
                                 f"{tokenizer.spec.dim} was asked; set the ColBERT dim to the saved one")
            colbert.linear.load_state_dict({"weight": weight})
        return colbert

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               scoring_mask: torch.Tensor) -> torch.Tensor:
        """Token vectors [batch, length, dim], unit length where scoring_mask is set and zero elsewhere."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vectors = self.linear(hidden) * scoring_mask.unsqueeze(-1).to(hidden.dtype)
        return nn.functional.normalize(vectors, p=2, dim=-1)

    def encode_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors and scoring mask of tokenizer inputs, or of length buckets (`td_ray.encoders.buckets`) padded
        with masked zero vectors to the longest bucket and put back in order."""
        if not is_bucketed(inputs):
            return self.encode(**inputs), inputs["scoring_mask"]
        length = max(part["input_ids"].shape[1] for part in inputs["buckets"])
        vectors = torch.cat([pad_length(self.encode(**part), length) for part in inputs["buckets"]])
        mask = torch.cat([pad_length(part["scoring_mask"], length) for part in inputs["buckets"]])
        return vectors[inputs["restore"]], mask[inputs["restore"]]

    def forward(self, query: dict[str, torch.Tensor], passages: dict,
                all_pairs: bool = False) -> torch.Tensor:
        """Scores [batch, nway] of `batch` queries against their `batch * nway` passages (grouped per query);
        with `all_pairs`, [batch, batch * nway]: every query against every passage (in-batch negatives)."""
        for name, inputs in (("query", query), ("passages", passages)):
            if not is_bucketed(inputs) and "scoring_mask" not in inputs:
                raise ValueError(f"the {name} batch has no scoring_mask: tokenize with ColBERTTokenizer.queries "
                                 "and .documents (td_ray.encoders.colbert), not the plain HF tokenizer")
        queries, (documents, doc_mask) = self.encode(**query), self.encode_inputs(passages)
        if all_pairs:
            batch = queries.shape[0]
            documents = documents.unsqueeze(0).expand(batch, *documents.shape)
            doc_mask = doc_mask.unsqueeze(0).expand(batch, *doc_mask.shape)
        return maxsim(queries, query["scoring_mask"], documents, doc_mask)

    def save_pretrained(self, directory: Path, tokenizer: ColBERTTokenizer) -> None:
        """The PLAID-X (HF_ColBERT) layout, which PLAID-X, Stanford ColBERT and PyLate load: one checkpoint holding
        the backbone under its prefix (`bert.`, `roberta.`) and the projection as `linear.weight`, the HF config, the
        tokenizer with its markers, and the spec as `artifact.metadata`."""
        from safetensors.torch import save_file

        if tokenizer.spec.dim != self.dim:
            raise ValueError(f"the tokenizer's spec says dim {tokenizer.spec.dim} but the model projects to "
                             f"{self.dim}; build both from the same ColBERTSpec")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.encoder.config)
        config.architectures = ["HF_ColBERT"]  # as PLAID-X saves it; PyLate reads a Stanford checkpoint by this name
        config.save_pretrained(directory)
        tokenizer.hf.save_pretrained(directory)
        prefix = self.encoder.base_model_prefix
        weights = {f"{prefix}.{name}": tensor.detach().cpu().clone().contiguous()
                   for name, tensor in self.encoder.state_dict().items()}
        weights[PROJECTION_KEY] = self.linear.weight.detach().cpu().contiguous()
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        metadata = tokenizer.spec.metadata() | ({"model_name": self.base_model} if self.base_model else {})
        (directory / PLAIDX_METADATA).write_text(json.dumps(metadata, indent=1), encoding="utf-8")


def base_model(directory: Path) -> str | None:
    """The `model_name` a PLAID-X checkpoint's metadata names (what it was trained from), or None."""
    path = directory / PLAIDX_METADATA
    return json.loads(path.read_text(encoding="utf-8")).get("model_name") if path.is_file() else None


def saved_projection(directory: Path) -> tuple[Path, torch.Tensor] | None:
    """The projection saved with a ColBERT model, and where: `linear.weight` in its checkpoint (PLAID-X layout:
    model.safetensors or pytorch_model.bin), or an older td-ray student's projection file; None for a bare encoder."""
    from safetensors import safe_open

    legacy = directory / PROJECTION_FILE
    if legacy.is_file():
        from safetensors.torch import load_file

        return legacy, load_file(str(legacy))["weight"]
    checkpoint = directory / "model.safetensors"
    if checkpoint.is_file():
        with safe_open(str(checkpoint), framework="pt") as weights:
            return (checkpoint, weights.get_tensor(PROJECTION_KEY)) if PROJECTION_KEY in weights.keys() else None
    checkpoint = directory / "pytorch_model.bin"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return (checkpoint, state[PROJECTION_KEY]) if PROJECTION_KEY in state else None
    return None


def load_colbert(model: str | Path, spec: ColBERTSpec | None = None) -> tuple[ColBERTEncoder, ColBERTTokenizer]:
    """Model and tokenizer together (the tokenizer decides the vocabulary size the model needs)."""
    tokenizer = ColBERTTokenizer.from_pretrained(model, spec)
    return ColBERTEncoder.from_pretrained(model, tokenizer), tokenizer


def score(model: nn.Module, tokenizer: ColBERTTokenizer, queries: list[str], passages: list[list[str]],
          device: torch.device | str | None = None) -> torch.Tensor:
    """Scores [len(queries), n] of each query against its own n passages; `model` may be DDP-wrapped."""
    if len(queries) != len(passages):
        raise ValueError(f"got {len(queries)} queries but {len(passages)} passage lists; pass one list per query")
    for index, group in enumerate(passages):
        if not group or len(group) != len(passages[0]):
            raise ValueError(f"query 0 has {len(passages[0])} passages but query {index} has {len(group)}: every "
                             "query needs the same number of passages, at least one (distill.nway); drop short "
                             "lists (distill.short_list_policy) or cut long ones")
    device = device or next(model.parameters()).device
    flat = [text for group in passages for text in group]
    return model(_to_device(tokenizer.queries(queries), device), _to_device(tokenizer.documents(flat), device))


class ColBERTStudentEncoder:
    """Inference wrapper for the index and evaluate stages: texts in, float32 token vectors out. Runs on the GPU its
    Ray worker reserved (`device` auto or None), under bf16 autocast there, else in fp32 on the reserved CPUs."""

    def __init__(self, model: str | Path, max_length: int | None = None, device: str | None = None,
                 batch_size: int = 64):
        spec = ColBERTSpec.load(model)
        if spec is None:
            raise ValueError(f"{model} holds no {PLAIDX_METADATA}: it is not a ColBERT model; index it as a dense "
                             "student")
        self.device = devices.resolve_device(device)
        devices.use_reserved_threads()
        self.model, self.tokenizer = load_colbert(model, spec)
        self.model = self.model.to(self.device).eval()
        self.max_length, self.batch_size = max_length or spec.doc_maxlen, batch_size

    @property
    def dim(self) -> int:
        return self.model.dim

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """[len(texts), query_maxlen, dim]: every query position scores, so none is dropped."""
        batches = []
        with torch.inference_mode(), devices.autocast(self.device):
            for start in range(0, len(texts), self.batch_size):
                inputs = _to_device(self.tokenizer.queries(texts[start:start + self.batch_size]), self.device)
                batches.append(self.model.encode(**inputs).float().cpu().numpy())
        if not batches:
            return np.zeros((0, self.tokenizer.spec.query_maxlen, self.dim), dtype=np.float32)
        return np.concatenate(batches)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """One [Li, dim] array per text, holding only the tokens MaxSim uses (no padding, nor punctuation
        when the spec masks it), like PLAID-X's ``doc(keep_dims=False)``."""
        documents = []
        with torch.inference_mode(), devices.autocast(self.device):
            for start in range(0, len(texts), self.batch_size):
                inputs = _to_device(self.tokenizer.documents(texts[start:start + self.batch_size], self.max_length),
                                    self.device)
                vectors = self.model.encode(**inputs).float().cpu().numpy()
                keep = inputs["scoring_mask"].cpu().numpy()
                documents.extend(row[mask] for row, mask in zip(vectors, keep))
        return documents
