"""Tensor-parallel shards <-> logical full tensors, as the axis table states the split.

A tensor split along `dim` with stride s is s sub-blocks along that dim (a gated `linear_fc1` is
[gate; up], s = 2), each cut into tp contiguous chunks; rank r stores [sub_0 chunk r; ...; sub_{s-1}
chunk r] (megatron-core's `partition_dim` / `partition_stride`). Slicing works on the logical tensor, so
a pruned model is re-sharded for the pruned sizes at the same TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.table import TensorAxes, axes_of


@dataclass(frozen=True)
class Partition:
    """How a tensor is split over TP ranks: along `dim`, in `stride` independently split sub-blocks."""

    dim: int
    stride: int = 1


def partition(axes: TensorAxes, gated_linear_unit: bool) -> Optional[Partition]:
    """The TP split of a tensor described by `axes` (None if replicated)."""
    if axes.tp_dim is None:
        return None
    return Partition(axes.tp_dim, 2 if axes.gated and gated_linear_unit else 1)


def partitions(model: torch.nn.Module) -> Dict[str, Partition]:
    """{state-dict name: Partition} for the tensors of `model` that are split across TP ranks."""
    gated = bool(model.config.gated_linear_unit)
    out = {}
    for name in model.state_dict():
        axes = axes_of(name)[2]
        part = None if axes is None else partition(axes, gated)
        if part is not None:
            out[name] = part
    return out


def gather_full(local: torch.Tensor, part: Partition, ctx: ParallelContext) -> torch.Tensor:
    """The logical full tensor from this rank's shard (a collective over the TP group)."""
    shards = ctx.gather_over_tp(local)
    if len(shards) == 1:
        return local
    # each shard: [stride blocks] along dim -> regroup as block-major, rank-minor
    blocks = [shard.chunk(part.stride, dim=part.dim) for shard in shards]  # [tp][stride]
    return torch.cat([blocks[r][b] for b in range(part.stride) for r in range(len(shards))], dim=part.dim)


def shard(full: torch.Tensor, part: Partition, ctx: ParallelContext) -> torch.Tensor:
    """This rank's shard of a logical full tensor (inverse of `gather_full`)."""
    if ctx.tp_size == 1:
        return full
    size = full.shape[part.dim]
    if size % (part.stride * ctx.tp_size):
        raise ValueError(f"dim {part.dim} of size {size} does not split into {part.stride} x TP={ctx.tp_size} chunks")
    blocks = full.chunk(part.stride, dim=part.dim)
    return torch.cat([b.chunk(ctx.tp_size, dim=part.dim)[ctx.tp_rank] for b in blocks], dim=part.dim).contiguous()


def logical(local: torch.Tensor, part: Optional[Partition], ctx: ParallelContext) -> torch.Tensor:
    """`gather_full` for partitioned tensors, the tensor itself for replicated ones."""
    return local if part is None else gather_full(local, part, ctx)
