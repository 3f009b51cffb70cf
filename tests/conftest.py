"""Shared fixtures (one single-process gloo world for the tier-2 tests: real MCore modules on CPU) and the tiers.

Tiers: a test is `heavy` when it starts processes (torchrun worlds, the CLI or NeMo-Run in a subprocess) or runs
real round trips through Megatron-Bridge (its module says `pytestmark = pytest.mark.heavy`, or the test is
decorated), `slow` when it loads a real offline model; every other test is marked `fast` here: pure logic and
tiny single-process models, under a minute in all (`pytest -m fast`). CI runs every tier.
"""

import inspect

import pytest

from megatron_prune.minitron.runtime.distributed import init_distributed


@pytest.fixture()
def mcore():
    """A single-process megatron-core world (TP=PP=DP=1), seeded; idempotent across tests."""
    init_distributed(seed=1234)
    yield


# what a fast test may not call: it starts processes (keeps the tier honest as tests are added)
_SPAWNS = ("run_torchrun(", "subprocess.")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("heavy") or item.get_closest_marker("slow"):
            continue
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        spawns = [s for s in _SPAWNS if s in source]
        if spawns:
            raise pytest.UsageError(f"{item.nodeid} calls {spawns[0]!r} (it starts processes): mark it @pytest.mark.heavy")
        item.add_marker(pytest.mark.fast)
