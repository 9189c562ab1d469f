"""Which nway candidates, and in which languages, one training query gets: PLAID-X's samplers and MTD's mixing.

Pure numpy; every random choice comes from a ``np.random.Generator`` the caller seeds, so a worker that
seeds it from (seed, rank, epoch) replays the same examples.

Samplers (PLAID-X 0.3.1, ``colbert/training/lazy_batcher.py``) pick positions in a query's candidate list
ranked by teacher score, best first, from its top K:

- ``only_top``: the nway best (the public Translate-Distill command, ``--only_top``).
- ``random``: nway uniformly without replacement (PLAID-X shuffles all candidates and takes nway; the model
  cards' "randomly selected from 50").
- ``beta``: nway without replacement, position i of K weighted by the Beta(1, b) density at i / K, normalised,
  with b = 1 + progress * (max_beta - 1) and progress = step / total steps (PLAID-X's ``sampling_on_beta`` and
  ``sampling_max_beta``). It starts uniform (b = 1) and ends weighted towards the top (b = max_beta); max_beta
  1 is the random sampler. The density is taken at the grid points i / K, as PLAID-X does, not integrated
  over bins.

Like PLAID-X, ``random`` and ``beta`` do not force the best passage in; ``keep_top=True`` does (position 0 is
always taken and nway - 1 more are drawn from the rest), which a loss that reads column 0 as the positive
needs. Chosen positions are returned sorted, so the loss sees passages best-first: column 0 is the
best-scored passage chosen. PLAID-X leaves them in draw order; the KL loss does not depend on the order.

MTD (Lawrie, Yang et al., SIGIR 2024) draws each query's passages in several languages:

- ``mix-passages``: each passage in a language drawn independently and uniformly;
- ``mix-entries``: one uniformly drawn language for all passages of a query;
- ``round-robin``: the query is repeated once per language, every copy with the same passages and teacher
  scores, copy r in ``languages[r]`` (PLAID-X's ``MultiLangBatcher``, without its unpublished
  Jensen-Shannon regulariser).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from td_ray.errors import TdRayError

Sampler = Literal["only_top", "random", "beta"]
Mixing = Literal["mix-passages", "mix-entries", "round-robin"]
SAMPLERS: tuple[str, ...] = ("only_top", "random", "beta")
MIXINGS: tuple[str, ...] = ("mix-passages", "mix-entries", "round-robin")


class ShortListError(TdRayError):
    """A query cannot fill nway passages and the policy is `error`."""

    @classmethod
    def for_query(cls, qid: str, problem: str) -> ShortListError:
        """The error for query `qid`, which has `problem`, with the three ways out."""
        return cls(f"query {qid!r} has {problem}; lower distill.nway, score more candidates, or set "
                   "distill.short_list_policy: skip")


def _check_sizes(k: int, nway: int) -> None:
    if nway < 1 or k < nway:
        raise ValueError(f"cannot choose nway={nway} of {k} candidates; nway must be between 1 and the list length")


def sample_only_top(k: int, nway: int) -> np.ndarray:
    """Positions 0..nway-1 of a ranked list of `k`: the nway best."""
    _check_sizes(k, nway)
    return np.arange(nway)


def _weighted_without_replacement(weights: np.ndarray, nway: int, rng: np.random.Generator,
                                  keep_top: bool) -> np.ndarray:
    """Successive draws without replacement, each proportional to the weights of the positions left."""
    if keep_top and nway == 1:
        return np.zeros(1, dtype=np.int64)
    if keep_top:
        rest = weights[1:]
        drawn = rng.choice(len(rest), size=nway - 1, replace=False, p=rest / rest.sum()) + 1
        return np.sort(np.concatenate([[0], drawn]))
    return np.sort(rng.choice(len(weights), size=nway, replace=False, p=weights / weights.sum()))


def sample_random(k: int, nway: int, rng: np.random.Generator, keep_top: bool = False) -> np.ndarray:
    """`nway` positions of `k`, uniformly without replacement, sorted (position 0 forced in with `keep_top`)."""
    _check_sizes(k, nway)
    if keep_top:
        return np.sort(np.concatenate([[0], rng.choice(k - 1, size=nway - 1, replace=False) + 1]))
    return np.sort(rng.choice(k, size=nway, replace=False))


def beta_b(progress: float, max_beta: float) -> float:
    """PLAID-X's curriculum: Beta(1, b) with b growing linearly from 1 (progress 0) to max_beta (progress 1)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (step / total steps), got {progress}")
    if max_beta < 1.0:
        raise ValueError(f"max_beta must be at least 1 (1 samples uniformly), got {max_beta}")
    return 1.0 + progress * (max_beta - 1.0)


def beta_position_weights(k: int, progress: float, max_beta: float) -> np.ndarray:
    """Probabilities of positions 0..k-1 for one draw: the Beta(1, b) density at i / k, normalised."""
    b = beta_b(progress, max_beta)
    density = (1.0 - np.arange(k) / k) ** (b - 1.0)  # Beta(1, b) pdf up to its constant factor b
    return density / density.sum()


def sample_beta(k: int, nway: int, rng: np.random.Generator, progress: float, max_beta: float,
                keep_top: bool = False) -> np.ndarray:
    """`nway` positions of `k` drawn without replacement by `beta_position_weights`, sorted."""
    _check_sizes(k, nway)
    return _weighted_without_replacement(beta_position_weights(k, progress, max_beta), nway, rng, keep_top)


def sample_positions(sampler: Sampler, k: int, nway: int, rng: np.random.Generator, *, progress: float = 0.0,
                     max_beta: float = 1.0, keep_top: bool = False) -> np.ndarray:
    """Positions (sorted, best first) of the `nway` passages to train on, from a ranked list of `k`."""
    if sampler == "only_top":
        return sample_only_top(k, nway)
    if sampler == "random":
        return sample_random(k, nway, rng, keep_top)
    if sampler == "beta":
        return sample_beta(k, nway, rng, progress, max_beta, keep_top)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def entries_per_query(mixing: Mixing, languages: Sequence[str]) -> int:
    """Training entries one query yields: one per language under round-robin, else one."""
    _check_mixing(mixing, languages)
    return len(languages) if mixing == "round-robin" else 1


def _check_mixing(mixing: str, languages: Sequence[str]) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    if not languages:
        raise ValueError("give at least one passage language")


def entry_languages(mixing: Mixing, languages: Sequence[str], n_passages: int, rng: np.random.Generator,
                    repeat: int = 0) -> list[str]:
    """The language of each of an entry's `n_passages` passages.

    `repeat` is the copy's index among the query's round-robin entries (ignored by the other modes). With
    one language no random number is drawn.
    """
    _check_mixing(mixing, languages)
    if len(languages) == 1:
        return [languages[0]] * n_passages
    if mixing == "mix-passages":
        return [languages[i] for i in rng.integers(len(languages), size=n_passages)]
    if mixing == "mix-entries":
        return [languages[int(rng.integers(len(languages)))]] * n_passages
    return [languages[repeat % len(languages)]] * n_passages


@dataclass(frozen=True)
class TrainingEntry:
    """One entry: passage ids, raw teacher scores and passage languages, best-scored first.

    `candidate_indices` point into the candidate arrays as given to `build_entries`, so the caller can
    gather other aligned columns (passage text) the same way.
    """

    qid: str
    pids: list[str]
    teacher_scores: list[float]
    langs: list[str]
    candidate_indices: list[int]


def build_entries(qid: str, pids: Sequence, scores: Sequence[float], nway: int, rng: np.random.Generator, *,
                  languages: Sequence[str], sampler: Sampler = "only_top", mixing: Mixing = "mix-entries",
                  progress: float = 0.0, max_beta: float = 1.0, keep_top: bool = False, top_k: int | None = None,
                  short_list_policy: Literal["skip", "error"] = "skip") -> list[TrainingEntry] | None:
    """The training entries of one query from its scored candidates (any order), passages in `languages`.

    Candidates are ranked by score, highest first, ties by pid (as ``data.build_examples`` does), cut to the
    best `top_k` (all when None), and `nway` positions are sampled once; round-robin then yields one entry
    per language with those passages, the other modes one entry. A query with fewer than `nway` candidates
    returns None under ``short_list_policy="skip"`` and raises `ShortListError` under ``"error"``.
    """
    if len(pids) != len(scores):
        raise ValueError(f"query {qid!r} has {len(pids)} candidate ids but {len(scores)} scores")
    if top_k is not None and top_k < nway:
        raise ValueError(f"top_k={top_k} is smaller than nway={nway}; raise top_k or lower distill.nway")
    if len(pids) < nway:
        if short_list_policy == "error":
            raise ShortListError.for_query(qid, f"{len(pids)} scored candidates, fewer than nway={nway}")
        return None
    values = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(values).all():
        raise TdRayError(f"query {qid!r} has a teacher score that is NaN or infinite; rescore it or drop it")
    ids = np.asarray([str(pid) for pid in pids])
    ranked = np.lexsort((ids, -values))[:top_k]
    chosen = ranked[sample_positions(sampler, len(ranked), nway, rng, progress=progress, max_beta=max_beta,
                                     keep_top=keep_top)]
    chosen_pids, chosen_scores = ids[chosen].tolist(), values[chosen].tolist()
    return [TrainingEntry(str(qid), chosen_pids, chosen_scores, entry_languages(mixing, languages, nway, rng, repeat),
                            chosen.tolist())
            for repeat in range(entries_per_query(mixing, languages))]


def build_contrastive_entries(qid: str, pids: Sequence[str], positives: Sequence[str], nway: int,
                              rng: np.random.Generator, *, languages: Sequence[str], sampler: Sampler = "random",
                              mixing: Mixing = "mix-entries", progress: float = 0.0,
                              max_beta: float = 1.0) -> list[TrainingEntry]:
    """Translate-Train entries of one query: a judged positive drawn uniformly, then `nway - 1` negatives drawn by
    `sampler` from its unjudged candidates (`pids`, best-scored first). Teacher scores are the labels 1, 0, ... 0;
    `candidate_indices` point into `pids`, -1 for a positive that is not a candidate."""
    judged = set(positives)
    negatives = [pid for pid in pids if pid not in judged]
    if not positives or len(negatives) < nway - 1:
        raise ShortListError(f"query {qid!r} has {len(positives)} positives and {len(negatives)} unjudged "
                             f"candidates; it needs 1 and nway - 1 = {nway - 1}")
    positive = str(positives[int(rng.integers(len(positives)))])
    drawn = [negatives[i] for i in sample_positions(sampler, len(negatives), nway - 1, rng, progress=progress,
                                                      max_beta=max_beta)]
    chosen = [positive, *drawn]
    where = {pid: index for index, pid in enumerate(pids)}
    labels = [1.0] + [0.0] * (nway - 1)
    return [TrainingEntry(str(qid), chosen, labels, entry_languages(mixing, languages, nway, rng, repeat),
                          [where.get(pid, -1) for pid in chosen])
            for repeat in range(entries_per_query(mixing, languages))]
