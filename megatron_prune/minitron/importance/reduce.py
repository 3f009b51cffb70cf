"""Exact distributed reductions of raw statistics.

Tensor-parallel ranks see disjoint channels of the row-parallel inputs (heads of linear_proj, FFN
channels of linear_fc2; routed experts' over the expert-TP ranks), concatenated here in rank order, and
identical copies of everything else. Each
pipeline stage holds the statistics of its own layers; data-parallel replicas of a stage hold partial
sums over their share of the calibration batches. `reduce_statistics` returns, identically on every
rank, the statistics of *all* layers summed over all replicas: the same numbers a single process would have
accumulated over the same batches (up to float summation order across DP replicas).
"""

from __future__ import annotations

import torch

from megatron_prune.minitron.importance.hooks import EXPERT_SITE_DIMS, TP_PARTITIONED_SITES, parse_stat_key
from megatron_prune.minitron.importance.statistics import StatStore
from megatron_prune.minitron.runtime.parallel import ParallelContext


def reduce_statistics(local: StatStore, ctx: ParallelContext) -> StatStore:
    """TP concat of partitioned channels, DP sum, then a union over pipeline stages (keys are global).

    Routed experts' statistics: channels concatenated over the expert-TP ranks, experts over the expert-parallel
    ranks (each holds its own), summed over the replicas of each expert (each micro-batch was counted by one
    of them: hooks.ExpertTokens)."""
    stage = local.to_cpu()
    expert_keys = [k for k in sorted(stage.keys()) if parse_stat_key(k)[1] in EXPERT_SITE_DIMS]
    dense_keys = [k for k in sorted(stage.keys()) if k not in set(expert_keys)]
    _concat_channels(stage, dense_keys, ctx)
    _concat_channels(stage, expert_keys, ctx.for_routed_experts())
    if ctx.ep_size > 1:
        for k in expert_keys:
            stage.sums[k] = torch.cat(ctx.gather_over_ep(stage.sums[k]), dim=EXPERT_SITE_DIMS[parse_stat_key(k)[1]])
    experts = StatStore({k: stage.sums.pop(k) for k in expert_keys}).reduce(ctx.sum_over_expert_dp)
    stage = stage.reduce(ctx.sum_over_dp)
    stage.sums.update(experts.sums)
    parts = ctx.gather_over_pp(stage.state_dict())
    sums = {}
    for part in parts:  # stages hold disjoint layers: a union, not a sum
        overlap = sums.keys() & part["sums"].keys()
        if overlap:
            raise RuntimeError(f"two pipeline stages reported the same statistics: {sorted(overlap)[:4]}")
        sums.update(part["sums"])
    # every stage sees every micro-batch, so the call count is the same on all stages
    full = StatStore(sums, calls=max(int(p["calls"]) for p in parts))
    # Statistics every TP rank computed for itself (replicated sites) could differ in the last bit between
    # ranks; ranks must rank channels identically, so all take global rank 0's copy.
    return StatStore.from_state_dict(ctx.broadcast_object(full.state_dict()))


def _concat_channels(stage: StatStore, keys, ctx: ParallelContext) -> None:
    """Concatenate, in rank order over `ctx`'s TP group, the channels (last dim: [C], or [E, C] per routed expert)
    of the statistics among `keys` that each TP rank sees a slice of; one collective for all of them."""
    keys = [k for k in keys if parse_stat_key(k)[1] in TP_PARTITIONED_SITES]
    if ctx.tp_size == 1 or not keys:
        return
    flat = torch.cat([stage.sums[k].reshape(-1) for k in keys])
    shards = [s.split([stage.sums[k].numel() for k in keys]) for s in ctx.gather_over_tp(flat)]
    for i, k in enumerate(keys):
        stage.sums[k] = torch.cat([parts[i].view(stage.sums[k].shape) for parts in shards], dim=-1)
