"""Pure teacher logic: a sequence-classification cross-encoder scores (query, passage) pairs.

Scores are the raw logit (never squashed by a sigmoid), so any later softmax sees the teacher's real margins.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from td_ray import devices
from td_ray.errors import ModelError
from td_ray.keys import HashSet, key_hashes
from td_ray.workspace import CANDIDATES, Workspace

logger = logging.getLogger(__name__)


def check_teacher(model: str, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """Fail fast, on the driver and from the config alone, if `model` is no single-logit cross-encoder."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"teacher {model!r} cannot be loaded ({error}); set score.teacher to a local "
                         "directory or a reachable hub id") from None
    if config.num_labels != 1:
        raise ModelError(f"teacher {model!r} has {config.num_labels} output labels; a cross-encoder "
                         "teacher must have exactly one relevance logit")


DEFAULT_MAX_BATCH_TOKENS = 16384
"""Padded tokens per forward pass when the config gives no budget (count x longest input)."""


def token_budget_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group's count x longest length within the budget (one over it alone).

    >>> token_budget_batches([3, 9, 4, 8], 16)
    [[1], [3, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded(rows: list[list[int]], pad: int):
    """`rows` as one right-padded long tensor and its attention mask."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class CrossEncoderPairs:
    """The cross-encoder's tokenizer alone: (query, passage) texts to token ids, on a CPU, without the model."""

    def __init__(self, model: str, max_length: int, revision: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.max_length = max_length

    def encode(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """`input_ids` (and `token_type_ids` where the model has them) of each pair, unpadded."""
        encoded = self.tokenizer(list(queries), list(passages), truncation="longest_first",
                                 max_length=self.max_length)
        return {name: encoded[name] for name in ("input_ids", "token_type_ids") if name in encoded}


class CrossEncoderTeacher:
    """An AutoModelForSequenceClassification with one output logit per pair, in eval mode: on the GPU its Ray worker
    reserved (`device` auto or None) under bf16 autocast, else in fp32 on the reserved CPUs. The weights are read
    straight onto that device (no second copy in host RAM)."""

    def __init__(self, model: str, max_length: int, revision: str | None = None, trust_remote_code: bool = False,
                 device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        check_teacher(model, revision, trust_remote_code)
        self.device = devices.resolve_device(device)
        devices.use_reserved_threads()
        self.pairs = CrossEncoderPairs(model, max_length, revision, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, device_map=self.device
        ).eval()
        self.pad = self.pairs.tokenizer.pad_token_id or 0
        self.model_seconds = 0.0  # of the last `score_encoded`

    def score(self, queries: list[str], passages: list[str], max_batch_tokens: int | None = None) -> np.ndarray:
        """The relevance logit of each (query, passage) pair, as float32 in input order."""
        return self.score_encoded(self.pairs.encode(queries, passages), max_batch_tokens)

    def score_encoded(self, encoded: dict[str, list[list[int]]], max_batch_tokens: int | None = None) -> np.ndarray:
        """Scores of pairs `CrossEncoderPairs.encode` made, in their order (see `score_in_budget`)."""
        def inputs(batch: list[int]) -> dict:
            ids, mask = padded([encoded["input_ids"][i] for i in batch], self.pad)
            made = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in encoded:
                made["token_type_ids"] = padded([encoded["token_type_ids"][i] for i in batch], 0)[0]
            return {name: tensor.to(self.device, non_blocking=True) for name, tensor in made.items()}

        def forward(batch_inputs: dict):
            with devices.autocast(self.device):
                return self.model(**batch_inputs).logits[:, 0].float()

        scores, self.model_seconds = score_in_budget(encoded["input_ids"], max_batch_tokens, inputs, forward)
        return scores


def score_in_budget(rows: list[list[int]], max_batch_tokens: int | None, inputs, forward) -> tuple[np.ndarray, float]:
    """Run the model over `rows` longest first in token-budget batches, so little of each pass is padding: `inputs`
    makes a batch's device tensors from its row indices, `forward` turns them into float scores on the device. The
    scores come back to the host once, in the rows' order, so the GPU queues every pass without waiting for the CPU.
    Returns them and the seconds spent in `forward` and the read-back (the rest of a call is host work in series)."""
    import torch

    if not rows:
        return np.empty(0, dtype=np.float32), 0.0
    batches = token_budget_batches([len(row) for row in rows], max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS)
    model_seconds, outputs = 0.0, []
    with torch.inference_mode():
        for batch in batches:
            made = inputs(batch)
            started = time.perf_counter()
            outputs.append(forward(made))
            model_seconds += time.perf_counter() - started
        started = time.perf_counter()
        scores = torch.cat(outputs).cpu().numpy()
        model_seconds += time.perf_counter() - started
    ordered = np.empty(len(rows), dtype=np.float32)
    ordered[np.concatenate([np.asarray(batch) for batch in batches])] = scores
    return ordered, model_seconds


BLOCKS = "score/blocks"
"""Scored blocks of an unfinished run, one directory per inputs-and-settings fingerprint: the unit of resume."""
TODO = "score/todo.parquet"
"""This run's work list: the (qid, pid) pairs no committed block holds."""
_TODO_ROW_GROUP = 8192


def kept_candidates(workspace: Workspace, top_k: int):
    """A re-readable stream of the (qid, pid) pairs to score: each query's candidates ranked within `top_k`."""
    def batches():
        for batch in workspace.iter_batches(CANDIDATES, ["qid", "pid", "rank"]):
            yield batch.filter(pc.less_equal(batch.column(2), top_k)).select([0, 1])
    return batches


def block_batches(workspace: Workspace, directory: str, columns: list[str] | None = None):
    """Every committed block's rows, file after file."""
    for name in workspace.block_names(directory):
        yield from workspace.iter_batches(f"{directory}/{name}", columns)


def write_todo(workspace: Workspace, directory: str, top_k: int) -> int:
    """The kept pairs that no block of `directory` holds, as the work list Ray Data reads; returns its rows."""
    committed = HashSet.of(block_batches(workspace, directory, ["qid", "pid"]))
    rows = 0
    with workspace.atomic_writer(TODO, pa.schema([("qid", pa.string()), ("pid", pa.string())])) as writer:
        for batch in kept_candidates(workspace, top_k)():
            todo = batch.filter(pa.array(~committed.contains(key_hashes(batch))))
            if todo.num_rows:
                writer.write_table(pa.Table.from_batches([todo]), row_group_size=_TODO_ROW_GROUP)
                rows += todo.num_rows
    return rows
