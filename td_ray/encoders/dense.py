"""The dense student: a single-vector dual encoder (one shared transformer for queries and passages)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from td_ray import devices
from td_ray.encoders.buckets import is_bucketed
from td_ray.errors import ModelError

logger = logging.getLogger(__name__)

LEGACY_SPEC_FILE = "td_ray_student.json"
"""Where students saved before the sentence-transformers layout kept their pooling and similarity."""
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


def write_sentence_transformers_layout(directory: Path, hidden: int, pooling: str, similarity: str,
                                       max_length: int) -> None:
    """The files that make an HF folder a sentence-transformers model with td-ray's pooling and similarity:
    `modules.json` (Transformer at the root, Pooling, and Normalize for cosine), the Pooling config, and the
    similarity function, so `SentenceTransformer(directory)` gives td-ray's vectors."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if similarity == "cosine":
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (directory / NORMALIZE_DIR).mkdir(exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                     "do_lower_case": False}))
    (directory / POOLING_DIR).mkdir(exist_ok=True)
    (directory / POOLING_DIR / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}, indent=2))
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
         "similarity_fn_name": "cosine" if similarity == "cosine" else "dot"}, indent=2))


def saved_pooling(model: str | Path) -> tuple[str | None, str | None]:
    """(pooling, similarity) saved with a model: a sentence-transformers folder's Pooling and Normalize modules (any
    such model, td-ray's students included), else an older student's td_ray_student.json; (None, None) for a bare
    HF model. A pooling td-ray cannot reproduce is refused."""
    directory = Path(model)
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        modules = {module["type"].rsplit(".", 1)[-1]: module["path"]
                   for module in json.loads(modules_file.read_text(encoding="utf-8"))}
        pooling = None
        if "Pooling" in modules:
            config = json.loads((directory / modules["Pooling"] / "config.json").read_text(encoding="utf-8"))
            chosen = [name for name, on in config.items() if name.startswith("pooling_mode_") and on]
            if chosen not in (["pooling_mode_cls_token"], ["pooling_mode_mean_tokens"]):
                raise ModelError(f"{directory} pools with {chosen}; td-ray reproduces CLS or mean pooling only")
            pooling = "cls" if chosen == ["pooling_mode_cls_token"] else "mean"
        settings = directory / "config_sentence_transformers.json"
        named = json.loads(settings.read_text(encoding="utf-8")).get("similarity_fn_name") if settings.is_file() else None
        similarity = "cosine" if "Normalize" in modules or named == "cosine" else "dot"
        return pooling, similarity
    legacy = directory / LEGACY_SPEC_FILE
    if legacy.is_file():
        saved = json.loads(legacy.read_text(encoding="utf-8"))
        return saved.get("pooling"), saved.get("similarity")
    return None, None


def load_encoder(model: str):
    """An AutoModel without its pooler: DDP rejects parameters that get no gradient, and the pooler is one."""
    from transformers import AutoModel

    try:
        try:
            return AutoModel.from_pretrained(model, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler do not take the argument
            return AutoModel.from_pretrained(model)
    except OSError as error:
        raise ModelError(f"student {model!r} cannot be loaded ({error}); pass a local directory or a reachable hub id") from None


class DualEncoder(nn.Module):
    """Encodes queries and passages into one vector each (CLS or mean pooling); relevance is their dot product,
    or their cosine (`similarity="cosine"` makes every vector unit length, so FAISS inner products stay right)."""

    def __init__(self, encoder: nn.Module, pooling: str = "cls", similarity: str = "dot"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be `cls` or `mean`, got {pooling!r}")
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be `dot` or `cosine`, got {similarity!r}")
        self.encoder, self.pooling, self.similarity = encoder, pooling, similarity

    @classmethod
    def from_pretrained(cls, model: str, pooling: str | None = None, similarity: str | None = None) -> DualEncoder:
        """Load a student; `pooling` and `similarity` default to the ones saved with it (`saved_pooling`), else CLS
        and dot."""
        saved_pool, saved_similarity = saved_pooling(model)
        return cls(load_encoder(model), pooling or saved_pool or "cls", similarity or saved_similarity or "dot")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per sequence: [batch, hidden]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.similarity == "cosine" else pooled

    def encode_inputs(self, inputs: dict) -> torch.Tensor:
        """`encode` over tokenizer inputs, or over length buckets (`td_ray.encoders.buckets`) put back in order."""
        if is_bucketed(inputs):
            parts = [self.encode(part["input_ids"], part["attention_mask"]) for part in inputs["buckets"]]
            return torch.cat(parts)[inputs["restore"]]
        return self.encode(inputs["input_ids"], inputs["attention_mask"])

    def forward(self, query: dict[str, torch.Tensor], passages: dict,
                all_pairs: bool = False) -> torch.Tensor:
        """Scores [batch, nway] of `batch` queries against their `batch * nway` passages (grouped per query);
        with `all_pairs`, [batch, batch * nway]: every query against every passage (in-batch negatives)."""
        queries = self.encode(query["input_ids"], query["attention_mask"])
        encoded = self.encode_inputs(passages)
        if all_pairs:
            return queries @ encoded.T
        if encoded.shape[0] % queries.shape[0]:
            raise ValueError(
                f"got {encoded.shape[0]} passages for {queries.shape[0]} queries; pass the same number of passages "
                "(nway) for every query, grouped query by query"
            )
        return torch.einsum("bh,bnh->bn", queries, encoded.view(queries.shape[0], -1, encoded.shape[-1]))

    def save_pretrained(self, directory: Path, tokenizer, max_length: int = 512) -> None:
        """An HF folder (weights, config, tokenizer) in the sentence-transformers layout, which holds the pooling and
        similarity: td-ray and `SentenceTransformer(directory)` load the same model from it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        write_sentence_transformers_layout(directory, int(self.encoder.config.hidden_size), self.pooling,
                                           self.similarity, max_length)


class StudentEncoder:
    """Inference wrapper: texts in, float32 vectors out. Used by the index and evaluate stages and the registry.
    Runs on the GPU its Ray worker reserved (`device` auto or None), under bf16 autocast there, else in fp32 on as
    many threads as the worker reserved CPUs."""

    def __init__(self, model: str, max_length: int = 180, device: str | None = None, batch_size: int = 64):
        from transformers import AutoTokenizer

        self.device = devices.resolve_device(device)
        devices.use_reserved_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = DualEncoder.from_pretrained(model).to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @property
    def dim(self) -> int:
        return int(self.model.encoder.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = []
        with torch.inference_mode(), devices.autocast(self.device):
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(texts[start:start + self.batch_size], truncation=True,
                                         max_length=self.max_length, padding=True, return_tensors="pt").to(self.device)
                vectors.append(self.model.encode(encoded["input_ids"], encoded["attention_mask"]).float().cpu().numpy())
        return np.concatenate(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
