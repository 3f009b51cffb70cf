"""Tensor-parallel shards <-> logical full tensors, as the axis table states the split.

A tensor split along `dim` with stride s is s sub-blocks along that dim (a gated `linear_fc1` is
[gate; up], s = 2), each cut into tp contiguous chunks; rank r stores [sub_0 chunk r; ...; sub_{s-1}
chunk r] (megatron-core's `partition_dim` / `partition_stride`). A Mamba mixer's `in_proj` and `conv1d` are
split the same way per segment of unequal length ([z, x, B, C, dt] and [x, B, C]). Routed experts' linears are split
over the expert tensor-parallel group (`expert_tensor_parallel_size`), everything else over the TP group. Slicing
works on the logical tensor, so a pruned model is re-sharded for the pruned sizes at the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.geometry import mamba_segments
from megatron_prune.minitron.slicing.table import TensorAxes, axes_of, is_routed_expert


@dataclass(frozen=True)
class Partition:
    """How a tensor is split over TP ranks: along `dim`, its blocks (`segments`: their full lengths, in order; None:
    `stride` equal blocks) each cut into tp contiguous chunks; rank r stores [block_0 chunk r; block_1 chunk r; ...]."""

    dim: int
    stride: int = 1
    segments: Optional[Tuple[int, ...]] = None
    routed_expert: bool = False  # split over the expert tensor-parallel group instead of the TP group

    def ranks(self, ctx: ParallelContext) -> ParallelContext:
        """The context whose TP fields are the ranks this tensor is split over."""
        return ctx.for_routed_experts() if self.routed_expert else ctx

    def blocks(self, length: int) -> List[int]:
        """The lengths of the blocks of a dim of `length` (full, or one rank's shard scaled by the same factor)."""
        if self.segments is None:
            return [length // self.stride] * self.stride
        total = sum(self.segments)
        if length % total and total % length:
            raise ValueError(f"dim {self.dim} of size {length} does not hold the segments {self.segments}")
        return [s * length // total for s in self.segments]


MambaSizes = Tuple[int, int, int, int]  # (nheads, head_dim, ngroups, d_state) of a model's Mamba mixers


def partition(axes: TensorAxes, gated_linear_unit: bool, mamba: Optional[MambaSizes] = None,
              routed_expert: bool = False) -> Optional[Partition]:  # fmt: skip
    """The TP split of a tensor described by `axes` (None if replicated); `mamba`: the Mamba mixer sizes the
    tensor has, for the tensors split per segment; `routed_expert`: a routed expert's tensor (expert TP group)."""
    if axes.tp_dim is None:
        return None
    if axes.segments is not None:
        if mamba is None:
            raise ValueError(f"the TP split of a {axes.segments} tensor needs the Mamba mixer sizes")
        return Partition(axes.tp_dim, segments=mamba_segments(axes.segments, *mamba))
    return Partition(axes.tp_dim, 2 if axes.gated and gated_linear_unit else 1, routed_expert=routed_expert)


def partition_of(name: str, gated_linear_unit: bool, mamba: Optional[MambaSizes] = None) -> Optional[Partition]:
    """The TP split of the state-dict tensor `name` (None if replicated or not in the axis table)."""
    axes = axes_of(name)[2]
    return None if axes is None else partition(axes, gated_linear_unit, mamba, routed_expert=is_routed_expert_tensor(name))


def ranks_of(name: str, ctx: ParallelContext) -> ParallelContext:
    """The context whose TP fields are the ranks the state-dict tensor `name` is split (or replicated) over: the
    expert-TP group for a routed expert's tensor, the TP group for any other."""
    return ctx.for_routed_experts() if is_routed_expert_tensor(name) else ctx


def split_size(name: str, ctx: ParallelContext) -> int:
    """How many ranks the state-dict tensor `name` is split over at this layout (1: replicated)."""
    axes = axes_of(name)[2]
    return 1 if axes is None or axes.tp_dim is None else ranks_of(name, ctx).tp_size


def is_routed_expert_tensor(name: str) -> bool:
    """Whether the state-dict tensor `name` belongs to one routed expert."""
    index, inner, _ = axes_of(name)
    return index is not None and is_routed_expert(inner)


def mamba_sizes(model: torch.nn.Module) -> Optional[MambaSizes]:
    """(nheads, head_dim, ngroups, d_state) of the model's Mamba mixers (global sizes; the same in every mixer of a
    homogeneous model), or None for a model without Mamba layers."""
    for module in model.modules():
        if hasattr(module, "nheads") and hasattr(module, "d_inner_local_tp"):
            return int(module.nheads), int(module.headdim), int(module.ngroups), int(module.d_state)
    return None


def partitions(model: torch.nn.Module) -> Dict[str, Partition]:
    """{state-dict name: Partition} for the tensors of `model` that are split across TP ranks."""
    gated, mamba = bool(model.config.gated_linear_unit), mamba_sizes(model)
    parts = {name: partition_of(name, gated, mamba) for name in model.state_dict()}
    return {name: part for name, part in parts.items() if part is not None}


def gather_full(local: torch.Tensor, part: Partition, ctx: ParallelContext) -> torch.Tensor:
    """The logical full tensor from this rank's shard (a collective over the TP or expert-TP group)."""
    shards = part.ranks(ctx).gather_over_tp(local)
    if len(shards) == 1:
        return local
    sizes = part.blocks(local.shape[part.dim])  # this rank's block lengths
    blocks = [shard.split(sizes, dim=part.dim) for shard in shards]  # [tp][block]
    return torch.cat([blocks[r][b] for b in range(len(sizes)) for r in range(len(shards))], dim=part.dim)


def shard(full: torch.Tensor, part: Partition, ctx: ParallelContext) -> torch.Tensor:
    """This rank's shard of a logical full tensor (inverse of `gather_full`)."""
    ctx = part.ranks(ctx)
    if ctx.tp_size == 1:
        return full
    sizes = part.blocks(full.shape[part.dim])
    if any(s % ctx.tp_size for s in sizes):
        raise ValueError(f"dim {part.dim} of size {full.shape[part.dim]} does not split into blocks {sizes} x TP={ctx.tp_size}")
    blocks = full.split(sizes, dim=part.dim)
    return torch.cat([b.chunk(ctx.tp_size, dim=part.dim)[ctx.tp_rank] for b in blocks], dim=part.dim).contiguous()


def logical(local: torch.Tensor, part: Optional[Partition], ctx: ParallelContext) -> torch.Tensor:
    """`gather_full` for partitioned tensors, the tensor itself for replicated ones."""
    return local if part is None else gather_full(local, part, ctx)
