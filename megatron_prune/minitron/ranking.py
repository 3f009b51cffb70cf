"""Ranking: raw statistics -> importance per axis (by the chosen criteria) -> orders (most important first).

Which statistic and which formula give each axis its importance is the criterion's (importance/criteria.py;
the reference's Minitron rules are the criteria named "minitron"). Orders then follow these rules:
  num_attention_heads  ranked *within* each query group (heads of a group share K/V)
  num_query_groups     the group criterion's importance (for an `Importance` without one: the L2 norm of
                       the group's head importances)
  mamba_num_heads      ranked *within* each Mamba group
  mamba_head_dim       L2 over heads of the [nh, hd] channel importance: one order shared by the layer's heads
  num_layers           descending block influence
All sorts are stable and descending, so ties keep the lower index first and every rank computes the
same orders from the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.importance.criteria import CRITERIA, resolve_criteria
from megatron_prune.minitron.importance.hooks import stat_key, statistics_by_layer
from megatron_prune.minitron.importance.statistics import StatStore

Tensor = torch.Tensor

# Per-layer channel axes: the Importance / LayerOrders / LayerKeep field that holds each one's values.
AXIS_FIELDS = {
    "ffn_hidden_size": "ffn",
    "num_moe_experts": "experts",
    "moe_ffn_hidden_size": "moe_ffn",
    "moe_shared_expert_intermediate_size": "shared_ffn",
}
# Every per-layer axis -> its Importance field.
IMPORTANCE_FIELDS = {**AXIS_FIELDS, "num_attention_heads": "heads", "num_query_groups": "groups",
                     "mamba_num_heads": "mamba_heads", "mamba_head_dim": "mamba"}  # fmt: skip


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
    groups: Dict[int, Tensor] = field(default_factory=dict)  # [G] per attention layer (optional: else from heads)
    mamba_heads: Dict[int, Tensor] = field(default_factory=dict)  # [nh] per Mamba layer (optional: else from mamba)


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


def score_importance(stats: StatStore, shape: ModelShape, criteria: Optional[Mapping[str, str]] = None) -> Importance:
    """Turn raw sums (all layers present) into importance by `criteria` ({axis: criterion}, defaults for the
    others). Raises ValueError if calibration saw no data or a criterion's statistic is missing."""
    from megatron_prune.minitron.importance.criteria import missing_statistics

    criteria = resolve_criteria(criteria)
    present = statistics_by_layer(stats.keys())
    if sorted(present) != list(range(1, shape.num_layers + 1)):
        raise ValueError(f"statistics cover layers {sorted(present)}, expected 1..{shape.num_layers}")
    if stats.calls == 0:
        raise ValueError("no calibration data reached the model: forward_loop ran no forward pass")
    missing = missing_statistics(present, criteria)
    if missing:
        raise ValueError("; ".join(missing))
    imp = Importance(hidden=torch.zeros(shape.hidden_size), ffn={}, heads={}, layers={})
    hidden = CRITERIA["hidden_size"][criteria["hidden_size"]]
    for n in sorted(present):  # layer by layer, the same order on every rank
        for site in hidden.statistics:  # every pre-sublayer norm of the layer contributes
            if site in present[n]:
                imp.hidden += hidden.score(stats[stat_key(n, site)], shape)
        imp.layers[n] = float(stats[stat_key(n, CRITERIA["num_layers"][criteria["num_layers"]].statistics[0])])
        for axis, field_name in IMPORTANCE_FIELDS.items():
            criterion = CRITERIA[axis][criteria[axis]]
            if criterion.statistics[0] in present[n]:
                getattr(imp, field_name)[n] = criterion.score(stats[stat_key(n, criterion.statistics[0])], shape)
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
            groups = imp.groups[n] if n in imp.groups else per_group.norm(dim=1)
            o.groups, o.heads = descending(groups), descending(per_group, dim=1)
        if n in imp.mamba:
            x = imp.mamba[n]  # [nh, hd]
            heads = imp.mamba_heads[n] if n in imp.mamba_heads else x.norm(dim=1)
            o.mamba_dims = descending(x.norm(dim=0))
            o.mamba_heads = descending(heads.view(shape.mamba_num_groups, -1), dim=1)  # [ng, nh/ng]
        layers[n] = o
    ranking = sorted(imp.layers, key=lambda n: -imp.layers[n])  # sorted() is stable
    return Orders(hidden=descending(imp.hidden), layers=layers, layer_ranking=ranking)
