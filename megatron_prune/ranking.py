"""Ranking: raw statistics -> importance per axis -> orders (most important first).

Owns the Minitron scoring rules (algorithm §4-§6):
  hidden_size          sum over every pre-sublayer norm of sqrt(channel statistic)      [H]
  ffn_hidden_size      sqrt(channel statistic) of linear_fc2's input, per layer          [F]
  num_attention_heads  L2 over d of sqrt(channel statistic) of linear_proj's input       [N]
                       ranked *within* each query group (heads of a group share K/V)
  num_query_groups     L2 norm of the group's head importances                           [G]
  num_layers           block influence, sum over calls of 1 - cos(layer in, layer out)
All sorts are stable and descending, so ties keep the lower index first and every rank computes the
same orders from the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megatron_prune.config import ModelShape
from megatron_prune.importance.hooks import parse_stat_key, stat_key
from megatron_prune.importance.statistics import StatStore

Tensor = torch.Tensor


@dataclass
class Importance:
    """Importance per axis; higher is more important. Layer dicts are keyed by global layer number."""

    hidden: Tensor  # [H]
    ffn: Dict[int, Tensor]  # [F] per layer
    heads: Dict[int, Tensor]  # [N] per layer, head h = g*q + j
    layers: Dict[int, float]  # block influence per layer


@dataclass
class LayerOrders:
    ffn: Tensor  # [F] channel indices, most important first
    groups: Tensor  # [G] query-group indices, most important first
    heads: Tensor  # [G, q] local head indices within each group, most important first


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
    hidden = torch.zeros(shape.hidden_size)
    ffn, heads, layers = {}, {}, {}
    for n in numbers:
        hidden += stats[stat_key(n, "qkv_in")].sqrt() + stats[stat_key(n, "fc1_in")].sqrt()
        ffn[n] = stats[stat_key(n, "fc2_in")].sqrt()
        per_channel = stats[stat_key(n, "proj_in")].sqrt().view(shape.num_attention_heads, shape.kv_channels)
        heads[n] = per_channel.norm(dim=1)  # [N]
        layers[n] = float(stats[stat_key(n, "block")])
    return Importance(hidden=hidden, ffn=ffn, heads=heads, layers=layers)


def descending(x: Tensor, dim: int = -1) -> Tensor:
    """Stable descending argsort: the deterministic order used for every axis."""
    return torch.argsort(x, dim=dim, descending=True, stable=True)


def rank_orders(imp: Importance, shape: ModelShape) -> Orders:
    G, q = shape.num_query_groups, shape.heads_per_group
    layers = {}
    for n, head_imp in imp.heads.items():
        per_group = head_imp.view(G, q)  # [G, q], heads are group-major
        layers[n] = LayerOrders(
            ffn=descending(imp.ffn[n]),
            groups=descending(per_group.norm(dim=1)),
            heads=descending(per_group, dim=1),
        )
    ranking = sorted(imp.layers, key=lambda n: -imp.layers[n])  # sorted() is stable
    return Orders(hidden=descending(imp.hidden), layers=layers, layer_ranking=ranking)
