"""Pure teacher logic: a sequence-classification cross-encoder scores (query, passage) pairs.

Scores are the raw logit (never squashed by a sigmoid), so any later softmax sees the teacher's real margins.
"""
from __future__ import annotations

import logging

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


class CrossEncoderTeacher:
    """An AutoModelForSequenceClassification with one output logit per pair, in eval mode: on the GPU its Ray worker
    reserved (`device` auto or None) under bf16 autocast, else in fp32 on the reserved CPUs."""

    def __init__(self, model: str, max_length: int, revision: str | None = None, trust_remote_code: bool = False,
                 device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_teacher(model, revision, trust_remote_code)
        self.device = devices.resolve_device(device)
        devices.use_reserved_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        self.max_length = max_length

    def score(self, queries: list[str], passages: list[str]) -> np.ndarray:
        """The relevance logit of each (query, passage) pair, as float32."""
        import torch

        encoded = self.tokenizer(queries, passages, truncation="longest_first", max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode(), devices.autocast(self.device):
            logits = self.model(**encoded).logits[:, 0]
        return logits.float().cpu().numpy()


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
