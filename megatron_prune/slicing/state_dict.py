"""Slice a rank's state dict according to a plan, reading dims from the axis table, tensor by tensor.

Decoder layers are renamed to their new local position (survivors keep their relative order), so the
tensors fit exactly the stage a stock MCore model builds from the pruned config. `sliced_tensors` yields
them one at a time and `load_streaming` copies each into the pruned model as it comes, so pruning holds
the original model, the pruned one and a single extra tensor at a time.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Tuple

import torch

from megatron_prune.config import ModelShape, UnsupportedModelError
from megatron_prune.runtime.parallel import ParallelContext
from megatron_prune.slicing import geometry as geo
from megatron_prune.slicing.plan import LayerKeep, PrunePlan
from megatron_prune.slicing.table import FC1_ROWS, FFN, HEAD_COLS, HIDDEN, QKV_ROWS, axes_of, layer_name
from megatron_prune.slicing.tensor_parallel import gather_full, partition, shard


def _index(geometry: str, plan: PrunePlan, keep: Optional[LayerKeep], shape: ModelShape) -> Optional[torch.Tensor]:
    if geometry == HIDDEN:
        return plan.hidden
    if keep is None:
        raise ValueError(f"geometry {geometry} used outside a decoder layer")
    q, d = shape.heads_per_group, shape.kv_channels
    if geometry == QKV_ROWS:
        return None if keep.groups is None else geo.qkv_rows(keep.groups, keep.heads, q, d)
    if geometry == HEAD_COLS:
        return None if keep.groups is None else geo.head_columns(keep.groups, keep.heads, q, d)
    if geometry == FC1_ROWS:
        return None if keep.ffn is None else geo.gated_rows(keep.ffn, shape.ffn_hidden_size, shape.gated_linear_unit)
    if geometry == FFN:
        return keep.ffn
    raise KeyError(f"unknown geometry {geometry!r}")


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
    new_position = {n: i for i, n in enumerate(survivors)}
    for name, value in state.items():
        local, inner, axes = axes_of(name)
        number = None if local is None else layer_numbers[local]
        if number is not None:
            if number not in plan.layers:
                continue  # dropped layer
            name = layer_name(new_position[number], inner)
        if not isinstance(value, torch.Tensor) or name.endswith("._extra_state"):
            yield name, value
            continue
        if axes is None:
            raise UnsupportedModelError(f"no axis-table entry for tensor '{name}'")
        keep = plan.layers[number] if number is not None else None
        index_of = lambda g: _index(g, plan, keep, shape)  # noqa: E731
        part = partition(axes, shape.gated_linear_unit) if ctx is not None and ctx.tp_size > 1 else None
        if part is not None and part.dim in axes.dims and index_of(axes.dims[part.dim]) is not None:
            yield name, shard(slice_tensor(gather_full(value, part, ctx), axes.dims, index_of), part, ctx)
        else:
            yield name, slice_tensor(value, axes.dims, index_of)


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
