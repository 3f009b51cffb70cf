"""Ranking: raw statistics -> importance per axis -> orders (most important first).

Owns the Minitron scoring rules (algorithm §4-§6):
  hidden_size          sum over every pre-sublayer norm of sqrt(channel statistic)      [H]
  ffn_hidden_size, moe_shared_expert_intermediate_size
                       sqrt(channel statistic) of the MLP's linear_fc2 input, per layer  [F], [Fs]
  moe_ffn_hidden_size  the same per routed expert, each expert ranked on its own         [E, Fm]
  num_moe_experts      mean per-token output norm of each routed expert                  [E]
  num_attention_heads  L2 over d of sqrt(channel statistic) of linear_proj's input       [N]
                       ranked *within* each query group (heads of a group share K/V)
  num_query_groups     L2 norm of the group's head importances                           [G]
  mamba_head_dim       from X = sqrt(channel statistic) of the x segment of a Mamba in_proj's output,
                       viewed [nh, hd]: L2 over heads of X (one order shared by the layer's heads) [hd]
  mamba_num_heads      L2 over the head's channels of X, ranked *within* each Mamba group  [nh]
  num_layers           block influence, sum over calls of 1 - cos(layer in, layer out)
Which statistic informs which axis is stated once, by the hook sites (`importance.hooks.LAYER_SITES`).
All sorts are stable and descending, so ties keep the lower index first and every rank computes the
same orders from the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_prune.config import ModelShape
from megatron_prune.importance.hooks import SITES, parse_stat_key
from megatron_prune.importance.statistics import StatStore

Tensor = torch.Tensor

# Per-layer channel axes: the Importance / LayerOrders / LayerKeep field that holds each one's values.
AXIS_FIELDS = {
    "ffn_hidden_size": "ffn",
    "num_moe_experts": "experts",
    "moe_ffn_hidden_size": "moe_ffn",
    "moe_shared_expert_intermediate_size": "shared_ffn",
}


@dataclass
class Importance:
    """Importance per axis; higher is more important. Layer dicts are keyed by global layer number and hold
    the layers that have the module (e.g. `ffn` the layers with a dense MLP, `experts` the MoE layers)."""

    hidden: Tensor  # [H]
    ffn: Dict[int, Tensor]  # [F] per dense-MLP layer
    heads: Dict[int, Tensor]  # [N] per attention layer, head h = g*q + j
    layers: Dict[int, float]  # block influence per layer
    experts: Dict[int, Tensor] = field(default_factory=dict)  # [E] per MoE layer
    moe_ffn: Dict[int, Tensor] = field(default_factory=dict)  # [E, Fm] per MoE layer (row e: routed expert e)
    shared_ffn: Dict[int, Tensor] = field(default_factory=dict)  # [Fs] per MoE layer with a shared expert
    mamba: Dict[int, Tensor] = field(default_factory=dict)  # [nh, hd] per Mamba layer: channel importance of x


@dataclass
class LayerOrders:
    """Orders of one layer (None where the layer has no such module)."""

    ffn: Optional[Tensor] = None  # [F] channel indices, most important first
    groups: Optional[Tensor] = None  # [G] query-group indices, most important first
    heads: Optional[Tensor] = None  # [G, q] local head indices within each group, most important first
    experts: Optional[Tensor] = None  # [E] routed experts
    moe_ffn: Optional[Tensor] = None  # [E, Fm] each routed expert's channels
    shared_ffn: Optional[Tensor] = None  # [Fs]
    mamba_heads: Optional[Tensor] = None  # [ng, nh/ng] Mamba heads within each group (local indices)
    mamba_dims: Optional[Tensor] = None  # [hd] channels within every Mamba head


@dataclass
class Orders:
    hidden: Tensor  # [H]
    layers: Dict[int, LayerOrders]
    layer_ranking: List[int]  # global layer numbers, most important first


def score_importance(stats: StatStore, shape: ModelShape) -> Importance:
    """Turn raw sums (all layers present) into importance. Raises if calibration saw no data."""
    numbers = sorted({parse_stat_key(k)[0] for k in stats.keys()})
    if numbers != list(range(1, shape.num_layers + 1)):
        raise ValueError(f"statistics cover layers {numbers}, expected 1..{shape.num_layers}")
    if stats.calls == 0:
        raise ValueError("no calibration data reached the model: forward_loop ran no forward pass")
    imp = Importance(hidden=torch.zeros(shape.hidden_size), ffn={}, heads={}, layers={})
    for key in sorted(stats.keys(), key=parse_stat_key):  # layer by layer, the same order on every rank
        n, name = parse_stat_key(key)
        site, value = SITES[name], stats[key]
        if site.kind == "block":
            imp.layers[n] = float(value)
        elif site.kind == "expert_outputs":  # [2, E]: summed output norms, token counts
            imp.experts[n] = value[0] / (value[1] + 1e-8)
        elif site.axis == "hidden_size":
            imp.hidden += value.sqrt()
        elif site.kind == "mamba_x":
            imp.mamba[n] = value.sqrt().view(shape.mamba_num_heads, shape.mamba_head_dim)  # [nh, hd]
        elif site.axis == "num_attention_heads":
            imp.heads[n] = value.sqrt().view(shape.num_attention_heads, shape.kv_channels).norm(dim=1)  # [N]
        else:
            getattr(imp, AXIS_FIELDS[site.axis])[n] = value.sqrt()
    return imp


def descending(x: Tensor, dim: int = -1) -> Tensor:
    """Stable descending argsort: the deterministic order used for every axis."""
    return torch.argsort(x, dim=dim, descending=True, stable=True)


def rank_orders(imp: Importance, shape: ModelShape) -> Orders:
    G, q = shape.num_query_groups, shape.heads_per_group
    layers = {}
    for n in imp.layers:
        o = LayerOrders()
        for name in AXIS_FIELDS.values():  # per channel (per routed expert for [E, Fm]: along the last dim)
            values = getattr(imp, name).get(n)
            if values is not None:
                setattr(o, name, descending(values))
        if n in imp.heads:
            per_group = imp.heads[n].view(G, q)  # [G, q], heads are group-major
            o.groups, o.heads = descending(per_group.norm(dim=1)), descending(per_group, dim=1)
        if n in imp.mamba:
            x = imp.mamba[n]  # [nh, hd]
            o.mamba_dims = descending(x.norm(dim=0))
            o.mamba_heads = descending(x.norm(dim=1).view(shape.mamba_num_groups, -1), dim=1)  # [ng, nh/ng]
        layers[n] = o
    ranking = sorted(imp.layers, key=lambda n: -imp.layers[n])  # sorted() is stable
    return Orders(hidden=descending(imp.hidden), layers=layers, layer_ranking=ranking)
