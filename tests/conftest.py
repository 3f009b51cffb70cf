"""Shared fixtures: one single-process gloo world for the tier-2 tests (real MCore modules on CPU)."""

import pytest

from megatron_prune.minitron.runtime.distributed import init_distributed


@pytest.fixture()
def mcore():
    """A single-process megatron-core world (TP=PP=DP=1), seeded; idempotent across tests."""
    init_distributed(seed=1234)
    yield
