"""Texts of one training batch encoded in length buckets: each bucket padded to its own longest, not the batch's.

A micro-batch of 8 queries x nway 6 holds 48 passages; padded together they take the longest one's length, and
40-50 % of the encoder's work is padding. Sorted by length and cut into a few buckets, each pads to its own longest;
the encoded rows are put back in the batch's order (`restore`) before scoring.
"""
from __future__ import annotations

import torch


def length_buckets(lengths: list[int], count: int) -> list[list[int]]:
    """Indices sorted by length (shortest first), cut into at most `count` groups of near-equal size.

    >>> length_buckets([30, 5, 12, 40, 7], 2)
    [[1, 4, 2], [0, 3]]
    >>> length_buckets([3, 1], 4)
    [[1], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    count = max(1, min(count, len(order)))
    size, extra = divmod(len(order), count)
    buckets, start = [], 0
    for bucket in range(count):
        end = start + size + (bucket < extra)
        buckets.append(order[start:end])
        start = end
    return [bucket for bucket in buckets if bucket]


def restore_order(buckets: list[list[int]]) -> torch.Tensor:
    """The index that puts the buckets' rows, concatenated, back in the batch's order.

    >>> restore_order([[1, 4, 2], [0, 3]]).tolist()
    [3, 0, 2, 4, 1]
    """
    flat = torch.tensor([index for bucket in buckets for index in bucket], dtype=torch.long)
    restore = torch.empty_like(flat)
    restore[flat] = torch.arange(len(flat))
    return restore


def is_bucketed(inputs: dict) -> bool:
    """Whether encoder inputs are bucketed (``{"buckets": [inputs, ...], "restore": index}``)."""
    return "buckets" in inputs


def pad_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` [rows, L, ...] zero-padded along dim 1 to `length`."""
    if tensor.shape[1] == length:
        return tensor
    pad = torch.zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]), dtype=tensor.dtype,
                      device=tensor.device)
    return torch.cat([tensor, pad], dim=1)
