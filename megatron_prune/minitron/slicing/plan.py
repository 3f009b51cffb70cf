"""Plan: (orders, target sizes) -> exactly which indices of every axis each layer keeps.

An axis the user did not ask to prune gets `None` (no permutation, no slicing). An axis in the
export config is *sorted* even at full size: kept indices appear in importance order, which is a
permutation of the original network and leaves its outputs unchanged (the "sort without slicing" test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.ranking import AXIS_FIELDS, Orders

Tensor = torch.Tensor


@dataclass
class LayerKeep:
    """What one layer keeps; None: everything, in the original order (or the layer has no such module)."""

    ffn: Optional[Tensor] = None  # [F'] kept channels
    groups: Optional[Tensor] = None  # [G'] kept query groups
    heads: Optional[Tensor] = None  # [G', q'] kept heads within each kept group (local indices)
    experts: Optional[Tensor] = None  # [E'] kept routed experts; kept expert j is original expert experts[j]
    moe_ffn: Optional[Tensor] = None  # [E, Fm'] kept channels of each *original* routed expert
    shared_ffn: Optional[Tensor] = None  # [Fs'] kept shared-expert channels
    mamba_heads: Optional[Tensor] = None  # [nh'] kept Mamba heads (global indices), group by group
    mamba_dims: Optional[Tensor] = None  # [hd'] kept channels within every Mamba head

    def channels(self, axis: str) -> Optional[Tensor]:
        """The kept indices of a per-layer channel axis (see `ranking.AXIS_FIELDS`)."""
        return getattr(self, AXIS_FIELDS[axis])


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
    sort_heads = "num_attention_heads" in requested or "num_query_groups" in requested
    n_keep = target["num_layers"]
    kept_layers = sorted(orders.layer_ranking[:n_keep]) if "num_layers" in requested else list(range(1, shape.num_layers + 1))
    layers = {}
    for n in kept_layers:
        o, keep = orders.layers[n], LayerKeep()
        for axis, name in AXIS_FIELDS.items():
            order = getattr(o, name)
            if axis in requested and order is not None:
                setattr(keep, name, order[..., : target[axis]])  # [E, Fm] orders: every expert keeps Fm'
        if sort_heads and o.heads is not None:
            groups_t, heads_t = target["num_query_groups"], target["num_attention_heads"]
            keep.groups = o.groups[:groups_t] if "num_query_groups" in requested else torch.arange(G)
            keep.heads = o.heads[keep.groups][:, : heads_t // groups_t]
        if o.mamba_heads is not None:  # the top heads of every group (B and C are per group: all groups stay)
            if "mamba_num_heads" in requested:
                per_group = o.mamba_heads.shape[1]
                local = o.mamba_heads[:, : target["mamba_num_heads"] // shape.mamba_num_groups]  # [ng, nh'/ng]
                keep.mamba_heads = (torch.arange(shape.mamba_num_groups)[:, None] * per_group + local).reshape(-1)
            if "mamba_head_dim" in requested:
                keep.mamba_dims = o.mamba_dims[: target["mamba_head_dim"]]
        layers[n] = keep
    return PrunePlan(
        target=dict(target),
        hidden=orders.hidden[: target["hidden_size"]] if "hidden_size" in requested else None,
        layers=layers,
        kept_layers=kept_layers,
        dropped_layers=sorted(set(range(1, shape.num_layers + 1)) - set(kept_layers)),
    )
