"""The doctests of the pure helpers: their examples are part of the documentation, and must stay true."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["td_ray.retrieval.token_math", "td_ray.retrieval.plaid", "td_ray.index.core", "td_ray.evaluate.core",
           "td_ray.workspace", "td_ray.fingerprint", "td_ray.cost", "td_ray.score.core", "td_ray.encoders.buckets",
           "td_ray.translate.actor", "td_ray.raydata", "td_ray.errors", "td_ray.lease"]


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_hold(name):
    failures, tried = doctest.testmod(importlib.import_module(name))
    assert tried > 0 and failures == 0
