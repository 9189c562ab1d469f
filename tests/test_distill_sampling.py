"""distill sampling: PLAID-X's only_top / random / beta samplers and MTD's language mixing follow their laws."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from td_ray.distill.sampling import (
    ShortListError,
    beta_b,
    beta_position_weights,
    build_entries,
    entries_per_query,
    entry_languages,
    sample_positions,
)

DRAWS = 20_000


def _draws(sampler: str, k: int, nway: int, seed: int = 0, n: int = DRAWS, **kwargs) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([sample_positions(sampler, k, nway, rng, **kwargs) for _ in range(n)])


def _inclusion_by_enumeration(weights: np.ndarray, nway: int) -> np.ndarray:
    """P(position i is chosen) under successive draws without replacement, summed over every ordered draw."""
    inclusion = np.zeros(len(weights))
    for order in itertools.permutations(range(len(weights)), nway):
        probability, left = 1.0, 1.0
        for position in order:
            probability *= weights[position] / left
            left -= weights[position]
        inclusion[list(order)] += probability
    return inclusion


def test_only_top_is_the_nway_best_every_time():
    draws = _draws("only_top", 50, 6, n=50)
    assert (draws == np.arange(6)).all()


@pytest.mark.parametrize("sampler", ["random", "beta"])
def test_draws_are_sorted_without_duplicates_and_reproducible(sampler):
    kwargs = {"progress": 0.7, "max_beta": 8.0} if sampler == "beta" else {}
    first = _draws(sampler, 12, 5, seed=3, n=500, **kwargs)
    assert (np.diff(first, axis=1) > 0).all()  # sorted, so also no position twice
    assert first.min() >= 0 and first.max() < 12
    assert (first == _draws(sampler, 12, 5, seed=3, n=500, **kwargs)).all()
    assert not (first == _draws(sampler, 12, 5, seed=4, n=500, **kwargs)).all()


def test_random_is_uniform_over_the_top_k():
    k, nway = 10, 3
    draws = _draws("random", k, nway)
    inclusion = np.bincount(draws.ravel(), minlength=k) / DRAWS
    assert np.abs(inclusion - nway / k).max() < 0.015  # 4.6 standard errors of sqrt(0.21 / 20000)
    # every 3-subset equally likely: chi-square over the 120 subsets (df 119; 200 is about 5 sd above the mean)
    counts = Counter(map(tuple, draws.tolist()))
    assert len(counts) == math.comb(k, nway)
    expected = DRAWS / math.comb(k, nway)
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 200


def test_keep_top_always_takes_the_best_and_samples_the_rest_uniformly():
    k, nway = 8, 3
    draws = _draws("random", k, nway, keep_top=True)
    assert (draws[:, 0] == 0).all()
    inclusion = np.bincount(draws[:, 1:].ravel(), minlength=k)[1:] / DRAWS
    assert np.abs(inclusion - (nway - 1) / (k - 1)).max() < 0.015


def test_beta_weights_are_the_beta_density_on_the_grid_and_follow_the_curriculum():
    k, max_beta = 10, 5.0
    assert beta_b(0.0, max_beta) == 1.0 and beta_b(1.0, max_beta) == max_beta and beta_b(0.5, max_beta) == 3.0
    np.testing.assert_allclose(beta_position_weights(k, 0.0, max_beta), np.full(k, 0.1))  # Beta(1, 1): uniform
    b = 3.0  # progress 0.5: Beta(1, 3), density 3 (1 - x)^2 at x = i / k
    density = np.array([b * (1 - i / k) ** (b - 1) for i in range(k)])
    np.testing.assert_allclose(beta_position_weights(k, 0.5, max_beta), density / density.sum())
    late = beta_position_weights(k, 1.0, max_beta)
    assert (np.diff(late) < 0).all() and late[0] > 4 * late[k // 2]  # top-heavy at the end of training


def test_beta_single_draws_follow_the_weights():
    k = 10
    weights = beta_position_weights(k, 0.8, 6.0)
    draws = _draws("beta", k, 1, progress=0.8, max_beta=6.0)
    frequencies = np.bincount(draws.ravel(), minlength=k) / DRAWS
    errors = np.sqrt(weights * (1 - weights) / DRAWS)
    assert (np.abs(frequencies - weights) < 4.5 * errors + 1e-4).all()


def test_beta_nway_draws_follow_successive_sampling_without_replacement():
    k, nway = 6, 3
    weights = beta_position_weights(k, 1.0, 4.0)
    expected = _inclusion_by_enumeration(weights, nway)
    assert expected.sum() == pytest.approx(nway)
    inclusion = np.bincount(_draws("beta", k, nway, progress=1.0, max_beta=4.0).ravel(), minlength=k) / DRAWS
    assert np.abs(inclusion - expected).max() < 0.015
    # and not simply nway times the single-draw weights (which would exceed 1 at the top)
    assert np.abs(expected - nway * weights).max() > 0.1


def test_beta_keep_top_draws_the_rest_from_the_renormalised_tail():
    k, nway = 6, 3
    weights = beta_position_weights(k, 1.0, 4.0)[1:]
    expected = _inclusion_by_enumeration(weights / weights.sum(), nway - 1)
    draws = _draws("beta", k, nway, progress=1.0, max_beta=4.0, keep_top=True)
    assert (draws[:, 0] == 0).all()
    inclusion = np.bincount(draws[:, 1:].ravel(), minlength=k)[1:] / DRAWS
    assert np.abs(inclusion - expected).max() < 0.015


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sampler": "top"}, "sampler must be one of"),
    ({"sampler": "beta", "progress": 1.5, "max_beta": 2.0}, r"progress must be in \[0, 1\]"),
    ({"sampler": "beta", "max_beta": 0.5}, "max_beta must be at least 1"),
])
def test_bad_sampler_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_positions(k=10, nway=3, rng=np.random.default_rng(0), **kwargs)


LANGS = ["zh", "fa", "ru"]


def test_mix_entries_gives_one_language_per_entry_in_equal_shares():
    rng = np.random.default_rng(0)
    entries = [entry_languages("mix-entries", LANGS, 6, rng) for _ in range(3000)]
    assert all(len(set(langs)) == 1 and len(langs) == 6 for langs in entries)
    shares = Counter(langs[0] for langs in entries)
    assert set(shares) == set(LANGS)
    assert all(abs(shares[lang] / 3000 - 1 / 3) < 0.035 for lang in LANGS)


def test_mix_passages_draws_each_passage_independently():
    rng = np.random.default_rng(1)
    entries = [entry_languages("mix-passages", LANGS, 6, rng) for _ in range(3000)]
    shares = Counter(lang for langs in entries for lang in langs)
    assert all(abs(shares[lang] / 18000 - 1 / 3) < 0.015 for lang in LANGS)
    # independent draws: an entry is all one language with probability 3 * (1/3)^6 = 1/243
    uniform_entries = sum(len(set(langs)) == 1 for langs in entries) / 3000
    assert uniform_entries < 0.012
    # and the first two passages agree a third of the time
    assert abs(sum(langs[0] == langs[1] for langs in entries) / 3000 - 1 / 3) < 0.035


def test_round_robin_cycles_exactly_and_repeats_the_query_once_per_language():
    rng = np.random.default_rng(2)
    cycled = [entry_languages("round-robin", LANGS, 4, rng, repeat=r)[0] for r in range(7)]
    assert cycled == ["zh", "fa", "ru", "zh", "fa", "ru", "zh"]
    assert entries_per_query("round-robin", LANGS) == 3 and entries_per_query("mix-entries", LANGS) == 1
    entries = build_entries("q1", ["a", "b", "c", "d"], [1.0, 4.0, 3.0, 2.0], 2, rng, sampler="random",
                            languages=LANGS, mixing="round-robin")
    assert [entry.langs for entry in entries] == [[lang] * 2 for lang in LANGS]
    assert len({tuple(entry.pids) for entry in entries}) == 1  # the same passages in every language
    assert len({tuple(entry.teacher_scores) for entry in entries}) == 1


def test_one_language_draws_no_random_numbers():
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    assert entry_languages("mix-passages", ["zh"], 3, rng) == ["zh", "zh", "zh"]
    assert rng.bit_generator.state == before


def test_build_entries_ranks_candidates_by_score_and_points_back_into_them():
    pids = ["p3", "p1", "p9", "p2", "p0"]
    scores = [0.5, 2.0, 1.0, 2.0, -1.0]  # p1 and p2 tie: pid order breaks it
    (entry,) = build_entries(7, pids, scores, 3, np.random.default_rng(0), languages=["zh"])
    assert entry.qid == "7"
    assert entry.pids == ["p1", "p2", "p9"]
    assert entry.teacher_scores == [2.0, 2.0, 1.0]
    assert entry.langs == ["zh"] * 3
    assert [pids[i] for i in entry.candidate_indices] == entry.pids


def test_build_entries_samples_only_inside_top_k():
    pids = [f"p{i}" for i in range(20)]
    scores = list(range(20))  # p19 best
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        (entry,) = build_entries("q", pids, scores, 3, rng, languages=["zh"], sampler="random", top_k=5)
        seen.update(entry.pids)
        assert entry.teacher_scores == sorted(entry.teacher_scores, reverse=True)
    assert seen == {"p19", "p18", "p17", "p16", "p15"}


def test_build_entries_is_reproducible_with_the_same_seed():
    pids, scores = [f"p{i}" for i in range(30)], np.linspace(0, 1, 30).tolist()

    def run(seed: int):
        rng = np.random.default_rng(seed)
        return [build_entries(str(q), pids, scores, 4, rng, sampler="beta", progress=0.5, max_beta=4.0,
                              languages=LANGS, mixing="mix-passages")[0] for q in range(20)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_short_lists_are_skipped_or_named():
    rng = np.random.default_rng(0)
    assert build_entries("q5", ["a", "b"], [1.0, 0.0], 3, rng, languages=["zh"]) is None
    with pytest.raises(ShortListError, match=r"query 'q5' has 2 scored candidates, fewer than nway=3"):
        build_entries("q5", ["a", "b"], [1.0, 0.0], 3, rng, languages=["zh"], short_list_policy="error")


def test_bad_candidate_lists_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="query 'q1' has 3 candidate ids but 2 scores"):
        build_entries("q1", ["a", "b", "c"], [1.0, 0.0], 2, rng, languages=["zh"])
    with pytest.raises(ValueError, match="query 'q2' has a teacher score that is NaN"):
        build_entries("q2", ["a", "b"], [1.0, float("nan")], 2, rng, languages=["zh"])
    with pytest.raises(ValueError, match="top_k=2 is smaller than nway=3"):
        build_entries("q3", ["a", "b", "c"], [1.0, 0.0, 2.0], 3, rng, languages=["zh"], top_k=2)
