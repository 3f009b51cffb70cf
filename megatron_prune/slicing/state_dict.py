"""Slice a rank's state dict according to a plan, reading dims from the axis table.

Decoder layers are renamed to their new local position (survivors keep their relative order), so the
result loads with `strict=True` into the stage a stock MCore model builds from the pruned config.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from megatron_prune.config import ModelShape
from megatron_prune.slicing import geometry as geo
from megatron_prune.slicing.plan import LayerKeep, PrunePlan
from megatron_prune.slicing.table import FC1_ROWS, FFN, HEAD_COLS, HIDDEN, LAYER_ROLES, MODEL_ROLES, QKV_ROWS, Dims, lookup

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


class UnsupportedModelError(ValueError):
    """The model holds a module the axis table does not describe."""


def split_name(name: str) -> Tuple[Optional[int], str, Optional[Dims]]:
    """(local decoder-layer index or None, name inside the layer/model, dims from the table or None)."""
    m = _LAYER.fullmatch(name)
    if m:
        return int(m[1]), m[2], lookup(LAYER_ROLES, m[2])
    return None, name, lookup(MODEL_ROLES, name)


def check_supported(model: torch.nn.Module) -> None:
    """Refuse, before any work, a model with a tensor no table entry owns (names the module type)."""
    for name in model.state_dict():
        if name.endswith("._extra_state"):
            continue
        if split_name(name)[2] is None:
            module = model.get_submodule(name.rpartition(".")[0])
            raise UnsupportedModelError(
                f"unsupported module type {type(module).__name__} at '{name.rpartition('.')[0]}' (tensor '{name}'): "
                "megatron-prune handles dense GPT layers (SelfAttention + MLP); MoE, Mamba and MLA are not supported yet"
            )


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


def slice_tensor(t: torch.Tensor, dims: Dims, index_of) -> torch.Tensor:
    """Gather `t` along each dim that has a (non-None) index; returns a new contiguous tensor."""
    out = t
    for dim, geometry in dims.items():
        idx = index_of(geometry)
        if idx is not None:
            out = out.index_select(dim, idx.to(out.device))
    return out.detach().clone().contiguous() if out is t else out.contiguous()


def slice_state_dict(
    state: Mapping[str, torch.Tensor], layer_numbers: Mapping[int, int], plan: PrunePlan, shape: ModelShape
) -> Dict[str, object]:
    """`layer_numbers`: {local index in decoder.layers: global layer number} for this rank."""
    survivors = [n for n in sorted(layer_numbers.values()) if n in plan.layers]
    new_position = {n: i for i, n in enumerate(survivors)}
    out: Dict[str, object] = {}
    for name, value in state.items():
        local, inner, dims = split_name(name)
        number = None if local is None else layer_numbers[local]
        if number is not None:
            if number not in plan.layers:
                continue  # dropped layer
            name = f"decoder.layers.{new_position[number]}.{inner}"
        if not isinstance(value, torch.Tensor) or name.endswith("._extra_state"):
            out[name] = value
            continue
        if dims is None:
            raise UnsupportedModelError(f"no axis-table entry for tensor '{inner}'")
        keep = plan.layers[number] if number is not None else None
        out[name] = slice_tensor(value, dims, lambda g: _index(g, plan, keep, shape))
    return out
