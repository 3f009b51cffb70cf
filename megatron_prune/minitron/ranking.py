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

from megatron_prune.minitron.axes import LAYER_AXES, axis_named
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.importance.criteria import CRITERIA, resolve_criteria
from megatron_prune.minitron.importance.hooks import stat_key, statistics_by_layer
from megatron_prune.minitron.importance.statistics import StatStore

Tensor = torch.Tensor
HEADS, GROUPS, MAMBA_HEADS, MAMBA_HEAD_DIM = "num_attention_heads", "num_query_groups", "mamba_num_heads", "mamba_head_dim"
# per-layer axes whose order is a plain sort of their importance (heads and Mamba axes are ranked within groups)
CHANNEL_AXES = tuple(a for a in LAYER_AXES if a not in (HEADS, GROUPS, MAMBA_HEADS, MAMBA_HEAD_DIM))


class ByAxis(dict):
    """{axis: value} over the per-layer axes (`axes.LAYER_AXES`, TransformerConfig names), also read by short
    name: ``d.ffn`` is ``d.get("ffn_hidden_size", default)`` (the registry's aliases)."""

    _default = None  # what a short name reads for an axis not in the dict

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            axis = axis_named(name).name
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no axis {name!r}") from None
        return self.get(axis, self._default() if callable(self._default) else self._default)


class LayerValues(ByAxis):
    """{axis: {global layer number: tensor}}; a short name reads {} for an axis no layer has."""

    _default = dict


@dataclass
class Importance:
    """Importance; higher is more important. `axes` holds the per-layer axes, each {layer: tensor} for the
    layers that have the module (e.g. `ffn_hidden_size` the layers with a dense MLP, `num_moe_experts` the
    MoE layers), and reads by short name too (``imp.ffn[3]``). Per layer:
      ffn_hidden_size [F]; num_attention_heads [N], head h = g*q + j; num_query_groups [G] (optional: else
      the L2 of each group's heads); num_moe_experts [E]; moe_ffn_hidden_size [E, Fm] (row e: routed expert e);
      moe_shared_expert_intermediate_size [Fs]; mamba_head_dim [nh, hd] (channel importance of x);
      mamba_num_heads [nh] (optional: else the L2 over each head's channels)."""

    hidden: Tensor  # [H]
    layers: Dict[int, float]  # block influence per layer
    axes: LayerValues = field(default_factory=LayerValues)

    def __post_init__(self):
        self.axes = LayerValues(self.axes)

    @classmethod
    def of(cls, hidden: Tensor, layers: Mapping[int, float], **per_layer: Mapping[int, Tensor]) -> "Importance":
        """``Importance.of(hidden=h, layers=influence, ffn={1: ..}, heads={1: ..})``: per-layer axes by field or
        short name."""
        return cls(hidden, dict(layers), LayerValues({axis_named(k).name: dict(v) for k, v in per_layer.items()}))

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "axes":
            raise AttributeError(name)
        return getattr(self.axes, name)


class LayerOrders(ByAxis):
    """Orders of one layer, {axis: indices, most important first} (absent: the layer has no such module):
    ffn_hidden_size [F]; num_query_groups [G]; num_attention_heads [G, q] local head indices within each
    group; num_moe_experts [E]; moe_ffn_hidden_size [E, Fm] each routed expert's channels;
    moe_shared_expert_intermediate_size [Fs]; mamba_num_heads [ng, nh/ng] within each group (local
    indices); mamba_head_dim [hd] channels within every Mamba head."""


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
    imp = Importance(hidden=torch.zeros(shape.hidden_size), layers={})
    hidden = CRITERIA["hidden_size"][criteria["hidden_size"]]
    for n in sorted(present):  # layer by layer, the same order on every rank
        for site in hidden.statistics:  # every pre-sublayer norm of the layer contributes
            if site in present[n]:
                imp.hidden += hidden.score(stats[stat_key(n, site)], shape)
        imp.layers[n] = float(stats[stat_key(n, CRITERIA["num_layers"][criteria["num_layers"]].statistics[0])])
        for axis in LAYER_AXES:
            criterion = CRITERIA[axis][criteria[axis]]
            if criterion.statistics[0] in present[n]:
                imp.axes.setdefault(axis, {})[n] = criterion.score(stats[stat_key(n, criterion.statistics[0])], shape)
    return imp


def descending(x: Tensor, dim: int = -1) -> Tensor:
    """Stable descending argsort: the deterministic order used for every axis."""
    return torch.argsort(x, dim=dim, descending=True, stable=True)


def rank_orders(imp: Importance, shape: ModelShape) -> Orders:
    G, q = shape.num_query_groups, shape.heads_per_group
    layers = {}
    for n in imp.layers:
        o = LayerOrders()
        for axis in CHANNEL_AXES:  # per channel (per routed expert for [E, Fm]: along the last dim)
            values = imp.axes.get(axis, {}).get(n)
            if values is not None:
                o[axis] = descending(values)
        if n in imp.heads:
            per_group = imp.heads[n].view(G, q)  # [G, q], heads are group-major
            groups = imp.groups[n] if n in imp.groups else per_group.norm(dim=1)
            o[GROUPS], o[HEADS] = descending(groups), descending(per_group, dim=1)
        if n in imp.mamba_head_dim:
            x = imp.mamba_head_dim[n]  # [nh, hd]
            heads = imp.mamba_heads[n] if n in imp.mamba_heads else x.norm(dim=1)
            o[MAMBA_HEAD_DIM] = descending(x.norm(dim=0))
            o[MAMBA_HEADS] = descending(heads.view(shape.mamba_num_groups, -1), dim=1)  # [ng, nh/ng]
        layers[n] = o
    ranking = sorted(imp.layers, key=lambda n: -imp.layers[n])  # sorted() is stable
    return Orders(hidden=descending(imp.hidden), layers=layers, layer_ranking=ranking)
