"""Plan: (orders, target sizes) -> exactly which indices of every axis each layer keeps.

An axis the user did not ask to prune gets `None` (no permutation, no slicing). An axis in the
export config is *sorted* even at full size: kept indices appear in importance order, which is a
permutation of the original network and leaves its outputs unchanged (the "sort without slicing" test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

from megatron_prune.config import ModelShape
from megatron_prune.ranking import Orders

Tensor = torch.Tensor


@dataclass
class LayerKeep:
    ffn: Optional[Tensor]  # [F'] kept channels, or None (all, original order)
    groups: Optional[Tensor]  # [G'] kept query groups
    heads: Optional[Tensor]  # [G', q'] kept heads within each kept group (local indices)


@dataclass
class PrunePlan:
    target: Dict[str, int]  # complete target sizes
    hidden: Optional[Tensor]  # [H'] kept hidden channels
    layers: Dict[int, LayerKeep]  # kept global layers only
    kept_layers: List[int]  # global numbers, original order
    dropped_layers: List[int]


def plan_pruning(orders: Orders, shape: ModelShape, target: Mapping[str, int], requested: Mapping[str, int]) -> PrunePlan:
    """`target`: complete sizes; `requested`: the axes the user named (those are sorted)."""
    G = shape.num_query_groups
    groups_t, heads_t = target["num_query_groups"], target["num_attention_heads"]
    sort_heads = "num_attention_heads" in requested or "num_query_groups" in requested
    n_keep = target["num_layers"]
    kept_layers = sorted(orders.layer_ranking[:n_keep]) if "num_layers" in requested else list(range(1, shape.num_layers + 1))
    layers = {}
    for n in kept_layers:
        o = orders.layers[n]
        if sort_heads:
            groups = o.groups[:groups_t] if "num_query_groups" in requested else torch.arange(G)
            heads = o.heads[groups][:, : heads_t // groups_t]
        else:
            groups = heads = None
        layers[n] = LayerKeep(
            ffn=o.ffn[: target["ffn_hidden_size"]] if "ffn_hidden_size" in requested else None,
            groups=groups,
            heads=heads,
        )
    return PrunePlan(
        target=dict(target),
        hidden=orders.hidden[: target["hidden_size"]] if "hidden_size" in requested else None,
        layers=layers,
        kept_layers=kept_layers,
        dropped_layers=sorted(set(range(1, shape.num_layers + 1)) - set(kept_layers)),
    )
