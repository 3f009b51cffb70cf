"""Build a subnet as a real, smaller model and recalibrate its BatchNorm statistics; score it.

    evaluator = Evaluator(base, space, orders, bn_batches, run, score_func, checkpoint)
    model = evaluator.build({"layer1.0.conv1": 32})   # sliced copy of `base`, BatchNorm recalibrated, eval mode
    evaluator.score({"layer1.0.conv1": 32})            # score_func on that model (cached in the checkpoint)

Every evaluated subnet is the model a user would get for those widths: the sliced weights and BatchNorm
statistics measured on the subnet's own activations (running averages over the calibration batches).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, List, Mapping, Optional

import torch
import torch.nn as nn

from megatron_prune.common.checkpoint import SearchCheckpoint
from megatron_prune.common.slicing import slice_model
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.importance import kept_units
from megatron_prune.fastnas.space import SearchSpace

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, run) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as plain averages over `batches`
    (BatchNorm in train mode, everything else in eval mode, no gradients). Returns the number of norms."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return len(norms)


def subnet_key(widths: Mapping[str, int], full: Mapping[str, int]) -> str:
    """A stable name for a subnet: the groups narrower than full, sorted ("" for the full model)."""
    return ",".join(f"{g}={w}" for g, w in sorted(widths.items()) if w != full[g])


class Evaluator:
    def __init__(self, base: nn.Module, space: SearchSpace, orders: Mapping[str, torch.Tensor], bn_batches: List,
                 run: Callable, score_func: Callable[[nn.Module], float], checkpoint: SearchCheckpoint,
                 log: Callable[[str], None] = lambda s: None):
        self.base, self.space, self.orders = base, space, orders
        self.bn_batches, self.run, self.score_func = bn_batches, run, score_func
        self.checkpoint, self.log = checkpoint, log
        self.calls = 0          # score_func calls made in this run
        self.seconds = 0.0      # spent building, recalibrating and scoring

    def build(self, widths: Mapping[str, int]) -> nn.Module:
        """A sliced copy of the base model at `widths`, BatchNorm recalibrated, in eval mode."""
        full = self.space.full
        kept = kept_units(self.orders, widths, full)
        model = slice_model(copy.deepcopy(self.base), self.space.analysis.tensors, kept, self.space.analysis.depthwise)
        recalibrate_batchnorm(model, self.bn_batches, self.run)
        return model.eval()

    def score(self, widths: Mapping[str, int], label: Optional[str] = None) -> float:
        key = subnet_key(widths, self.space.full)
        cached = self.checkpoint.get(key)
        if cached is not None:
            return cached
        start = time.time()
        model = self.build(widths)
        what = label or (key or "the original model (recalibrated)")
        try:
            value = self.score_func(model)
        except Exception as e:  # noqa: BLE001 - the user's function failed: say on which subnet
            raise PruneConfigError(f"score_func raised on subnet {what}: {type(e).__name__}: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise PruneConfigError(f"score_func returned {value!r} on subnet {what}: it must return a number (higher is better)") from None
        if not math.isfinite(value):
            raise PruneConfigError(f"score_func returned {value} on subnet {what}: it must be a finite number (higher is better)")
        self.calls += 1
        self.seconds += time.time() - start
        self.checkpoint.put(key, value)
        return value
