"""Importance criteria: a named, selectable estimator per axis, each a pure function of stored statistics.

A criterion reads one raw statistic of a layer (a hook site, `hooks.LAYER_SITES`, e.g. ``proj_heads_out``)
and turns it into that layer's importance for its axis (higher is more important). Calibration stores every
statistic its criteria read (or, asked to, every forward-only one, so that switching between forward-only
criteria needs no other pass); a forward loop that runs backward stores every statistic, Taylor ones included.

  axis                                  criterion            statistic            importance of a layer
  hidden_size                           minitron             *_in (every norm)    sum over norms of sqrt(stat)  [H]
  ffn_hidden_size, moe_ffn_hidden_size, minitron             fc2_in ...           sqrt(stat): L2 over samples of
   moe_shared_expert_intermediate_size                                            each sample's mean |x_c|    [F]
                                        output_contribution  fc2_out ...          sum_t |x_c| * ||W_fc2[:, c]||
                                        taylor (dense FFN)   fc2_taylor           sum_b |sum_t x_c * dL/dx_c|
  num_attention_heads                   minitron             proj_in              L2 over d of sqrt(stat)      [N]
                                        output_contribution  proj_heads_out       sum_t ||W_proj[:, h] x_h||
                                        taylor               proj_heads_taylor    sum_b |dL/dm_h|
  num_query_groups                      minitron             proj_in              L2 of the group's heads      [G]
                                        output_contribution  proj_groups_out      sum_t ||W_proj[:, g] x_g||
                                        taylor               proj_groups_taylor   sum_b |dL/dm_g|
  num_moe_experts                       minitron             experts              mean output norm per routed token [E]
                                        output_contribution  experts              summed output norm (x routing frequency)
  mamba_num_heads                       minitron             mamba_x              L2 over the head's x channels [nh]
                                        output_contribution  mamba_heads_out      sum_t ||W_out[:, h] y_h||
  mamba_head_dim                        minitron             mamba_x              L2 over heads of sqrt(stat)  [hd]
  num_layers                            block_influence      block                sum of 1 - cos(layer in, out)

"minitron" is the reference's statistic (NVIDIA Model Optimizer's `mcore_minitron`), kept for reproducibility.
"output_contribution" measures what the unit adds after its output projection: query heads of one KV group
share K and V, so their inputs to `linear_proj` differ only by attention pattern, and each head's own block of
`linear_proj` decides what reaches the residual stream. "taylor" is |gradient x mask| of a mask on the unit
(one backward pass through the pipeline schedule). Sums, not means, are stored (additive over calls, stages
and replicas); within a layer a constant factor does not change an order. The defaults were chosen by
measurement (benchmarks/quality/RESULTS.md); axes that could not be measured keep the reference's criterion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from megatron_prune.minitron.axes import ALIASES, AXES
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.slicing.geometry import value_dim

Tensor = torch.Tensor
Score = Callable[[Tensor, "object"], Tensor]  # (one layer's raw statistic, ModelShape) -> importance


@dataclass(frozen=True)
class Criterion:
    axis: str
    name: str
    statistics: Tuple[str, ...]  # the hook sites it reads (the first decides whether a layer has the module)
    score: Score
    needs_backward: bool = False


def _sqrt(v: Tensor, shape) -> Tensor:
    return v.sqrt()


def _same(v: Tensor, shape) -> Tensor:
    return v


def _minitron_heads(v: Tensor, shape) -> Tensor:  # [N*d] -> [N] (MLA: [N*v])
    return v.sqrt().view(shape.num_attention_heads, value_dim(shape)).norm(dim=1)


def _minitron_groups(v: Tensor, shape) -> Tensor:  # [N*d] -> [G]: L2 of the group's head importances
    return _minitron_heads(v, shape).view(shape.num_query_groups, shape.heads_per_group).norm(dim=1)


def _mamba_x(v: Tensor, shape) -> Tensor:  # [nh*hd] -> [nh, hd]
    return v.sqrt().view(shape.mamba_num_heads, shape.mamba_head_dim)


_HIDDEN_SITES = ("qkv_in", "mla_in", "fc1_in", "router_in", "mamba_in")


def _criteria() -> Dict[str, Dict[str, Criterion]]:
    table: Dict[str, Dict[str, Criterion]] = {}

    def add(axis: str, name: str, statistics, score: Score, needs_backward: bool = False) -> None:
        stats = (statistics,) if isinstance(statistics, str) else tuple(statistics)
        table.setdefault(axis, {})[name] = Criterion(axis, name, stats, score, needs_backward)

    add("hidden_size", "minitron", _HIDDEN_SITES, _sqrt)  # summed over the sites a layer has (ranking.py)
    for axis, prefix in (("ffn_hidden_size", "fc2"), ("moe_ffn_hidden_size", "expert_fc2"),
                         ("moe_shared_expert_intermediate_size", "shared_fc2")):  # fmt: skip
        add(axis, "minitron", f"{prefix}_in", _sqrt)
        add(axis, "output_contribution", f"{prefix}_out", _same)
    add("ffn_hidden_size", "taylor", "fc2_taylor", _same, needs_backward=True)
    add("num_attention_heads", "minitron", "proj_in", _minitron_heads)
    add("num_attention_heads", "output_contribution", "proj_heads_out", _same)
    add("num_attention_heads", "taylor", "proj_heads_taylor", _same, needs_backward=True)
    add("num_query_groups", "minitron", "proj_in", _minitron_groups)
    add("num_query_groups", "output_contribution", "proj_groups_out", _same)
    add("num_query_groups", "taylor", "proj_groups_taylor", _same, needs_backward=True)
    add("num_moe_experts", "minitron", "experts", lambda v, shape: v[0] / (v[1] + 1e-8))  # [2, E]: sums, counts
    add("num_moe_experts", "output_contribution", "experts", lambda v, shape: v[0])
    add("mamba_num_heads", "minitron", "mamba_x", lambda v, shape: _mamba_x(v, shape).norm(dim=1))
    add("mamba_num_heads", "output_contribution", "mamba_heads_out", _same)
    add("mamba_head_dim", "minitron", "mamba_x", _mamba_x)  # [nh, hd]: ranking takes the L2 over heads
    add("num_layers", "block_influence", "block", lambda v, shape: v)
    return table


CRITERIA: Dict[str, Dict[str, Criterion]] = _criteria()

# The default criterion of each axis is the axis registry's (chosen by measurement on SmolLM2-135M).
DEFAULT_CRITERIA: Dict[str, str] = {name: axis.criterion for name, axis in AXES.items()}

# The reference's criteria (NVIDIA Model Optimizer `mcore_minitron`), for reproducing it: `criteria="reference"`.
REFERENCE_CRITERIA: Dict[str, str] = {axis: next(iter(names)) for axis, names in CRITERIA.items()}

# Short names accepted on the command line (`--importance heads=output_contribution,ffn=minitron`): the registry's.
AXIS_ALIASES: Dict[str, str] = ALIASES


def resolve_criteria(spec: Union[None, str, Mapping[str, str]] = None) -> Dict[str, str]:
    """The criterion of every axis: the defaults, overridden by `spec` ({axis or alias: criterion} or the CLI
    form "heads=output_contribution,ffn=minitron"; "reference" alone: the reference's criteria). Unknown axes
    or criteria raise PruneConfigError listing the valid ones."""
    if isinstance(spec, str) and spec.strip() == "reference":
        return dict(REFERENCE_CRITERIA)
    chosen = dict(DEFAULT_CRITERIA)
    for key, name in (parse_criteria(spec) if isinstance(spec, str) else dict(spec or {})).items():
        axis = AXIS_ALIASES.get(key, key)
        if axis not in CRITERIA:
            valid = ", ".join(sorted(CRITERIA) + sorted(AXIS_ALIASES))
            raise PruneConfigError(f"importance criteria: unknown axis {key!r}; valid axes: {valid}")
        if name not in CRITERIA[axis]:
            raise PruneConfigError(f"importance criteria: unknown criterion {name!r} for {key}; valid: {', '.join(CRITERIA[axis])}")
        chosen[axis] = name
    return chosen


def parse_criteria(text: str) -> Dict[str, str]:
    """"heads=output_contribution,ffn=minitron" -> {"heads": "output_contribution", "ffn": "minitron"}."""
    out: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, eq, name = item.partition("=")
        if not eq or not axis.strip() or not name.strip():
            raise PruneConfigError(f"importance criteria: {item!r} is not AXIS=CRITERION (e.g. heads=output_contribution)")
        out[axis.strip()] = name.strip()
    return out


def criteria_at_layout(criteria: Mapping[str, str], shape, tp_size: int) -> Tuple[Dict[str, str], Optional[str]]:
    """The criteria a model (`shape`, a ModelShape) and layout can serve, and why they changed (None if they did not
    or the change is not worth a note): with fewer query groups than TP ranks megatron-core replicates K/V heads, no
    rank holds a whole group, and groups fall back to the reference's statistic. Multi-latent attention has no
    query groups at all (its heads are ranked as one group): the same statistic orders that one group, silently."""
    if shape.mla is not None:
        return {**criteria, "num_query_groups": "minitron"}, None
    num_query_groups = shape.num_query_groups
    if num_query_groups >= tp_size or criteria["num_query_groups"] == "minitron":
        return dict(criteria), None
    return {**criteria, "num_query_groups": "minitron"}, (
        f"num_query_groups={num_query_groups} < TP={tp_size}: K/V heads are replicated over TP ranks and groups "
        "cannot be pruned at this layout; they are ordered by the reference's statistic")  # fmt: skip


def chosen(criteria: Mapping[str, str]) -> List[Criterion]:
    return [CRITERIA[axis][name] for axis, name in criteria.items()]


def statistics_needed(criteria: Mapping[str, str], backward: bool = False, everything: bool = False) -> Tuple[str, ...]:
    """The statistics a calibration collects: those the chosen `criteria` read (the default: the cheapest pass), or
    every forward-only one with `everything` (so that forward-only criteria can be switched later without
    calibrating). A loop that runs `backward` collects every statistic, Taylor ones included: the backward pass
    costs several times what the statistics do."""
    from megatron_prune.minitron.importance.hooks import LAYER_SITES

    needed = {s for c in chosen(criteria) for s in c.statistics}
    return tuple(site.name for site in LAYER_SITES
                 if backward or (everything and not site.needs_backward) or site.name in needed)  # fmt: skip


def needing_backward(criteria: Mapping[str, str]) -> List[str]:
    """["heads=taylor", ...]: the chosen criteria that need a backward pass."""
    return [f"{c.axis}={c.name}" for c in chosen(criteria) if c.needs_backward]


def missing_statistics(present: Mapping[int, set], criteria: Mapping[str, str]) -> List[str]:
    """What the stored statistics lack for `criteria`: ["num_attention_heads=taylor needs 'proj_heads_taylor'"].

    `present`: {layer number: names of the statistics stored for it}. A layer has the criterion's module when
    it has some statistic observed at that module (every calibration stores one per hooked module: the one of
    its axis' criterion)."""
    from megatron_prune.minitron.importance.hooks import SITES

    problems = []
    for c in chosen(criteria):
        module = SITES[c.statistics[0]].module
        lacking = [n for n, names in present.items()
                   if c.statistics[0] not in names and any(SITES[name].module == module for name in names)]  # fmt: skip
        if lacking:
            problems.append(f"{c.axis}={c.name} needs statistic {c.statistics[0]!r} (missing for layers {lacking[:6]})")
    return problems


def describe(criteria: Mapping[str, str], shape: Optional[object] = None) -> str:
    """"heads=output_contribution, ffn=minitron, ..." for the axes the model has (all if no shape)."""
    short = {v: k for k, v in reversed(list(AXIS_ALIASES.items()))}
    axes = [a for a in criteria if shape is None or a == "num_layers" or shape.has(a)]
    return ", ".join(f"{short.get(a, a)}={criteria[a]}" for a in axes)
