"""Rank the channels of each group: which units a narrower width keeps.

Two criteria, both summed over every Conv/Linear that reads the group (each normalised by its own maximum,
so one big layer does not drown the others):

- `l2_norm` (Model Optimizer's): the L2 norm of the weight columns that read the unit, `||W[:, u]||`.
- `output_contribution` (default): how much the unit adds to each reader's output on calibration data,
  `sqrt(sum_p E[x_p^2] * ||W[:, p]||^2)` over the unit's input positions p (a channel, or the H*W positions a
  flattened channel becomes). A unit that is large in the weights but silent on real data ranks low.

A GroupNorm-tied group ranks whole GroupNorm groups (blocks) and keeps them whole.

    orders = rank_channels(model, space, "output_contribution", batches=bn_inputs)
    orders["layer1.0.conv1"]   -> LongTensor [64], most important unit first
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.space import SearchSpace

CRITERIA = ("output_contribution", "l2_norm")


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: List[str], batches, run) -> Dict[str, torch.Tensor]:
    """E[x^2] of each listed module's input, per position of its channel dim (dim 1 for convs, the last dim for
    linears; averaged over every other dim), on `batches` in eval mode. `run(model, batch)` does one forward."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    handles = []

    def hook(name, linear):
        def fn(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).reshape(x.shape[1], -1).t()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name in modules:
        m = model.get_submodule(name)
        handles.append(m.register_forward_pre_hook(hook(name, isinstance(m, nn.Linear))))
    try:
        model.eval()
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def rank_channels(model: nn.Module, space: SearchSpace, criterion: str = "output_contribution",
                  moments: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Unit order per searchable group, most important first."""
    if criterion not in CRITERIA:
        raise PruneConfigError(f"config['criterion']={criterion!r}: choose one of {', '.join(CRITERIA)}")
    searchable = space.searchable
    scores = {g: torch.zeros(space.analysis.groups[g].units, dtype=torch.float64) for g in searchable}
    for (module, attr), dim in space.analysis.consumers:
        extent = space.analysis.tensors[(module, attr)][dim]
        weight = getattr(model.get_submodule(module), attr).detach().double()
        energy = weight.pow(2).movedim(dim, 0).reshape(weight.shape[dim], -1).sum(1)  # [positions of dim]
        if criterion == "output_contribution":
            energy = energy * moments[module].double()
        for g in extent.groups:
            if g not in scores:
                continue
            unit = extent.unit_view(energy, 0, g).reshape(space.analysis.groups[g].units, -1).sum(1).sqrt()
            scores[g] += unit / (unit.max() + 1e-12)
    orders = {}
    for g, s in scores.items():
        block = space.analysis.groups[g].block
        if block > 1:  # rank whole blocks, keep each block's units in their order
            blocks = s.reshape(-1, block).sum(1).argsort(descending=True, stable=True)
            orders[g] = (blocks[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        else:
            orders[g] = s.argsort(descending=True, stable=True)
    return orders


def kept_units(orders: Mapping[str, torch.Tensor], widths: Mapping[str, int], full: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """The unit indices each group keeps at `widths`, ascending (so the sliced model keeps the original order);
    groups without an order (fixed) keep everything."""
    out = {}
    for g, n in full.items():
        w = widths.get(g, n)
        out[g] = orders[g][:w].sort().values if g in orders else torch.arange(n)
    return out
