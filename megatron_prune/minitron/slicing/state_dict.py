"""Slice a rank's state dict according to a plan, reading dims from the axis table, tensor by tensor.

Decoder layers are renamed to their new local position (survivors keep their relative order) and kept
routed experts to their position in importance order, so the tensors fit exactly the stage a stock MCore
model builds from the pruned config. `sliced_tensors` yields them one at a time and `load_streaming`
copies each into the pruned model as it comes, so pruning holds the original model, the pruned one and a
single extra tensor at a time.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch

from megatron_prune.errors import UnsupportedModelError
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.geometry import KINDS
from megatron_prune.minitron.slicing.plan import LayerKeep, PrunePlan
from megatron_prune.minitron.slicing.table import (
    HIDDEN, PER_EXPERT_AXES, Geometry, axes_of, expert_name, layer_name, split_expert_name,
)
from megatron_prune.minitron.slicing.tensor_parallel import gather_full, partition, shard


def _index(geometry: Geometry, plan: PrunePlan, keep: Optional[LayerKeep], shape: ModelShape,
           expert: Optional[int] = None) -> Optional[torch.Tensor]:  # fmt: skip
    """The indices a tensor dim keeps (None: all, in order), by the geometry's kind. `expert`: the original
    routed expert the tensor belongs to (for per-expert axes)."""
    if geometry == HIDDEN:
        return plan.hidden
    if keep is None:
        raise ValueError(f"geometry {geometry} used outside a decoder layer")

    def kept(axis: str) -> Optional[torch.Tensor]:
        indices = keep.get(axis)
        return indices[expert] if indices is not None and axis in PER_EXPERT_AXES else indices

    return KINDS[geometry.kind].index(kept, shape, geometry.axis)


def slice_tensor(t: torch.Tensor, dims: Mapping[int, str], index_of) -> torch.Tensor:
    """Gather `t` along each dim that has a (non-None) index; returns a new contiguous tensor."""
    out = t
    for dim, geometry in dims.items():
        idx = index_of(geometry)
        if idx is not None:
            out = out.index_select(dim, idx.to(out.device))
    return out.detach().clone().contiguous() if out is t else out.contiguous()


def sliced_tensors(
    state: Mapping[str, torch.Tensor],
    layer_numbers: Mapping[int, int],
    plan: PrunePlan,
    shape: ModelShape,
    ctx: ParallelContext | None = None,
) -> Iterator[Tuple[str, object]]:
    """Slice this rank's state dict: yields (pruned-model name, tensor or extra state), in state-dict order.

    `layer_numbers`: {local index in decoder.layers: global layer number} for this rank. A tensor split
    across TP ranks along a dim being sliced is gathered to its logical full form, sliced with global
    indices and re-sharded for the pruned model (one collective per such tensor, in state-dict order,
    identical on every TP rank); all other tensors are sliced locally.
    """
    survivors = [n for n in sorted(layer_numbers.values()) if n in plan.layers]
    before = after = None  # Mamba mixer sizes (nheads, head_dim, ngroups, d_state) before and after the prune
    if shape.mamba_num_heads:
        fixed = (shape.mamba_num_groups, shape.mamba_state_dim)
        before = (shape.mamba_num_heads, shape.mamba_head_dim, *fixed)
        after = (plan.target["mamba_num_heads"], plan.target["mamba_head_dim"], *fixed)
    new_position = {n: i for i, n in enumerate(survivors)}
    ep = ctx.ep_size if ctx is not None else 1
    exchanged: Dict[Tuple[int, str], Dict[int, object]] = {}  # EP > 1: (layer, role) -> {global expert: sliced tensor}
    for name, value in state.items():
        local, inner, axes = axes_of(name)
        number = None if local is None else layer_numbers[local]
        keep = expert = None
        renumbered = False
        if number is not None:
            if number not in plan.layers:
                continue  # dropped layer
            keep = plan.layers[number]
            expert, role_name = split_expert_name(inner)
            if expert is not None and ep > 1:  # this rank's experts are a slice of the global ones
                expert += ctx.ep_rank * (shape.num_moe_experts // ep)
            renumbered = expert is not None and keep.experts is not None  # kept experts, in importance order
            if renumbered and ep == 1:
                position = (keep.experts == expert).nonzero()
                if position.numel() == 0:
                    continue  # dropped routed expert
                inner = expert_name(int(position), role_name)
        is_tensor = isinstance(value, torch.Tensor) and not name.endswith("._extra_state")
        if is_tensor:
            if axes is None:
                raise UnsupportedModelError(f"no axis-table entry for tensor '{name}'")
            value = _slice(value, axes, lambda g: _index(g, plan, keep, shape, expert), expert is not None, shape,
                           before, after, ctx)  # fmt: skip
        if renumbered and ep > 1:  # re-distributed over the EP ranks
            yield from _exchange_experts(exchanged.setdefault((number, role_name), {}), value, expert, is_tensor,
                                         keep, shape, ctx, layer_name(new_position[number], role_name))  # fmt: skip
            continue
        yield (name if number is None else layer_name(new_position[number], inner)), value


def _slice(value: torch.Tensor, axes, index_of, routed_expert: bool, shape: ModelShape, before, after,
           ctx: Optional[ParallelContext]) -> torch.Tensor:  # fmt: skip
    """This rank's shard of the pruned tensor. A tensor split over TP (routed experts: expert-TP) ranks along a
    sliced dim is gathered to its logical full form, sliced with global indices and re-sharded for the pruned
    sizes (`before`/`after`: Mamba mixer sizes, whose segments shrink with the prune); others are sliced here."""
    part = None if ctx is None else partition(axes, shape.gated_linear_unit, before, routed_expert)
    if part is None or part.ranks(ctx).tp_size == 1 or part.dim not in axes.dims or index_of(axes.dims[part.dim]) is None:
        return slice_tensor(value, axes.dims, index_of)
    pruned = slice_tensor(gather_full(value, part, ctx), axes.dims, index_of)
    return shard(pruned, partition(axes, shape.gated_linear_unit, after, routed_expert), ctx)


def _exchange_experts(collected: Dict[int, object], value, expert: int, is_tensor: bool, keep, shape: ModelShape,
                      ctx: ParallelContext, role: str) -> Iterator[Tuple[str, object]]:
    """One sliced routed-expert tensor at EP > 1 (`expert`: its global number), gathered from every EP rank (each
    holds the same local slot of its own experts) into `collected` ({global expert: tensor}); once every expert of
    the role is in, this rank's experts of the pruned model: slot s holds kept expert `ctx.ep_rank * E'/ep + s`
    (importance order). One collective per tensor, the same on every EP rank. `role`: the pruned layer's name of
    the role (a ``*`` for the expert number)."""
    local_experts, kept_local = shape.num_moe_experts // ctx.ep_size, keep.experts.numel() // ctx.ep_size
    slot = expert % local_experts
    gathered = ctx.gather_over_ep(value) if is_tensor else [value] * ctx.ep_size  # extra state: every expert's is this rank's
    for rank, tensor in enumerate(gathered):
        collected[rank * local_experts + slot] = tensor
    if len(collected) == shape.num_moe_experts:
        for s in range(kept_local):
            yield expert_name(s, role), collected[int(keep.experts[ctx.ep_rank * kept_local + s])]
        collected.clear()


def load_streaming(model: torch.nn.Module, items: Iterable[Tuple[str, object]]) -> None:
    """Copy (name, tensor) pairs into `model` one at a time, as strictly as `load_state_dict(strict=True)`:
    every key of the model exactly once, no unknown key, identical shapes."""
    target = model.state_dict(keep_vars=True)
    seen, extra = set(), {}
    for name, value in items:
        if name not in target:
            raise KeyError(f"unexpected key '{name}' for the pruned model")
        seen.add(name)
        if name.endswith("._extra_state"):
            extra[name] = value
            continue
        if tuple(target[name].shape) != tuple(value.shape):
            raise ValueError(f"size mismatch for '{name}': sliced {tuple(value.shape)}, model {tuple(target[name].shape)}")
        with torch.no_grad():
            target[name].copy_(value)
    missing = sorted(set(target) - seen)
    if missing:
        raise KeyError(f"the pruned model has tensors nothing was sliced for: {missing[:5]}")
    if extra:
        model.load_state_dict(extra, strict=False)
