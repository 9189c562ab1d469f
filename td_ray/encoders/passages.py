"""Documents cut into overlapping passages of the student's tokens, as ColBERT-X indexes NeuCLIR (MaxP).

A document's text (title and body, as ingested) is tokenized with the student's tokenizer without special
tokens, cut into windows of `length` tokens starting every `stride` tokens, and each window decoded back to
text, which the encoder then reads like any passage. The last window ends at the document's end; ColBERT-X's
extra tail window, which lies inside the one before it, is not made. A document of at most `length` tokens is
one passage.
"""
from __future__ import annotations


def window_starts(tokens: int, length: int, stride: int) -> list[int]:
    """Where each window of a `tokens`-long document starts: 0, stride, 2 x stride, ... until one reaches the end."""
    if length < 1 or not 0 < stride <= length:
        raise ValueError(f"passages need 0 < stride <= length, got length {length} and stride {stride}")
    starts = [0]
    while starts[-1] + length < tokens:
        starts.append(starts[-1] + stride)
    return starts


def split_passages(tokenizer, texts: list[str], length: int, stride: int) -> list[list[str]]:
    """The passages of each text, in order: windows of `length` tokens every `stride` tokens, decoded to text."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    passages = []
    for text, ids in zip(texts, encoded):
        if len(ids) <= length:
            passages.append([text])
            continue
        passages.append([tokenizer.decode(ids[start:start + length]) for start in window_starts(len(ids), length, stride)])
    return passages
