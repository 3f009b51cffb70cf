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
from megatron_prune.minitron.ranking import CHANNEL_AXES, GROUPS, HEADS, MAMBA_HEAD_DIM, MAMBA_HEADS, ByAxis, Orders

Tensor = torch.Tensor


class LayerKeep(ByAxis):
    """What one layer keeps, {axis: kept indices}; absent: everything, in the original order (or the layer has
    no such module). Reads by short name too (``keep.ffn``, None when absent):
      ffn_hidden_size [F'] kept channels; num_query_groups [G'] kept query groups; num_attention_heads [G', q']
      kept heads within each kept group (local indices); num_moe_experts [E'] (kept expert j is original
      expert experts[j]); moe_ffn_hidden_size [E, Fm'] kept channels of each *original* routed expert;
      moe_shared_expert_intermediate_size [Fs']; mamba_num_heads [nh'] kept Mamba heads (global indices),
      group by group; mamba_head_dim [hd'] kept channels within every Mamba head."""


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
    sort_heads = HEADS in requested or GROUPS in requested
    n_keep = target["num_layers"]
    kept_layers = sorted(orders.layer_ranking[:n_keep]) if "num_layers" in requested else list(range(1, shape.num_layers + 1))
    layers = {}
    for n in kept_layers:
        o, keep = orders.layers[n], LayerKeep()
        for axis in CHANNEL_AXES:
            if axis in requested and axis in o:
                keep[axis] = o[axis][..., : target[axis]]  # [E, Fm] orders: every expert keeps Fm'
        if sort_heads and HEADS in o:
            groups_t, heads_t = target.get(GROUPS, G), target[HEADS]  # MLA: no groups axis, its heads are one group
            keep[GROUPS] = o[GROUPS][:groups_t] if GROUPS in requested else torch.arange(G)
            keep[HEADS] = o[HEADS][keep[GROUPS]][:, : heads_t // groups_t]
        if MAMBA_HEADS in o:  # the top heads of every group (B and C are per group: all groups stay)
            if MAMBA_HEADS in requested:
                per_group = o[MAMBA_HEADS].shape[1]
                local = o[MAMBA_HEADS][:, : target[MAMBA_HEADS] // shape.mamba_num_groups]  # [ng, nh'/ng]
                keep[MAMBA_HEADS] = (torch.arange(shape.mamba_num_groups)[:, None] * per_group + local).reshape(-1)
            if MAMBA_HEAD_DIM in requested:
                keep[MAMBA_HEAD_DIM] = o[MAMBA_HEAD_DIM][: target[MAMBA_HEAD_DIM]]
        layers[n] = keep
    return PrunePlan(
        target=dict(target),
        hidden=orders.hidden[: target["hidden_size"]] if "hidden_size" in requested else None,
        layers=layers,
        kept_layers=kept_layers,
        dropped_layers=sorted(set(range(1, shape.num_layers + 1)) - set(kept_layers)),
    )
