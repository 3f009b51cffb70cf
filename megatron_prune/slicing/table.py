"""The axis table: for each MCore module role, which dims of which tensors follow which axis.

Read by slicing, by tensor-parallel gathering/sharding and by the model check that refuses unsupported
modules. Keys are module paths as MCore names them; the Transformer Engine spec differs from the local
spec only in where a norm lives (`linear_qkv.layer_norm_weight` instead of `input_layernorm.weight`), so
both are listed side by side.

A dim maps to an index geometry:
  HIDDEN     kept hidden channels                           plan.hidden              [H']
  QKV_ROWS   kept [Q.., K, V] row blocks of kept groups     geometry.qkv_rows        [(G'(q'+2))d]
  HEAD_COLS  kept query-head columns of linear_proj         geometry.head_columns    [N'd]
  FC1_ROWS   kept FFN channels of fc1 ([gate; up] if gated) geometry.gated_rows      [F' or 2F']
  FFN        kept FFN channels (fc2 columns)                plan.layers[n].ffn       [F']
`tp_dim` is the dim Megatron splits across tensor-parallel ranks (column-parallel: output rows;
row-parallel: input columns; vocab-parallel embedding/output: vocabulary rows). It is stated here rather
than read from parameter attributes, which megatron-core omits when `perform_initialization=False`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

HIDDEN, QKV_ROWS, HEAD_COLS, FC1_ROWS, FFN = "hidden", "qkv_rows", "head_cols", "fc1_rows", "ffn"


@dataclass(frozen=True)
class TensorAxes:
    """How one tensor follows the axes: {dim: geometry}, and its tensor-parallel split."""

    dims: Mapping[int, str] = field(default_factory=dict)
    tp_dim: Optional[int] = None  # None: replicated on every TP rank
    gated: bool = False  # [gate; up] halves are split across TP separately (partition stride 2 when gated)


Role = Mapping[str, TensorAxes]  # parameter name -> axes

_NORM: Role = {"weight": TensorAxes({0: HIDDEN}), "bias": TensorAxes({0: HIDDEN})}
_FUSED_NORM: Role = {"layer_norm_weight": TensorAxes({0: HIDDEN}), "layer_norm_bias": TensorAxes({0: HIDDEN})}
_HEAD_DIM_NORM: Role = {"weight": TensorAxes(), "bias": TensorAxes()}  # q/k layernorms act on d: never pruned

# Roles inside one TransformerLayer (path relative to the layer).
LAYER_ROLES: Dict[str, Role] = {
    "input_layernorm": _NORM,
    "self_attention.linear_qkv": {
        "weight": TensorAxes({0: QKV_ROWS, 1: HIDDEN}, tp_dim=0),
        "bias": TensorAxes({0: QKV_ROWS}, tp_dim=0),
        **_FUSED_NORM,
    },
    "self_attention.q_layernorm": _HEAD_DIM_NORM,
    "self_attention.k_layernorm": _HEAD_DIM_NORM,
    "self_attention.linear_proj": {
        "weight": TensorAxes({0: HIDDEN, 1: HEAD_COLS}, tp_dim=1),
        "bias": TensorAxes({0: HIDDEN}),
    },
    "pre_mlp_layernorm": _NORM,
    "mlp.linear_fc1": {
        "weight": TensorAxes({0: FC1_ROWS, 1: HIDDEN}, tp_dim=0, gated=True),
        "bias": TensorAxes({0: FC1_ROWS}, tp_dim=0, gated=True),
        **_FUSED_NORM,
    },
    "mlp.linear_fc2": {"weight": TensorAxes({0: HIDDEN, 1: FFN}, tp_dim=1), "bias": TensorAxes({0: HIDDEN})},
}

# Roles outside the decoder layers (path relative to the GPTModel).
MODEL_ROLES: Dict[str, Role] = {
    "embedding.word_embeddings": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
    "embedding.position_embeddings": {"weight": TensorAxes({1: HIDDEN})},
    "decoder.final_layernorm": _NORM,
    "output_layer": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
}

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def _lookup(roles: Mapping[str, Role], name: str) -> Optional[TensorAxes]:
    module, _, param = name.rpartition(".")
    role = roles.get(module)
    return None if role is None else role.get(param)


def split_layer_name(name: str) -> Tuple[Optional[int], str]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> (3, ``mlp.linear_fc1.weight``); other names -> (None, name)."""
    m = _LAYER.fullmatch(name)
    return (int(m[1]), m[2]) if m else (None, name)


def layer_name(index: int, inner: str) -> str:
    """Inverse of `split_layer_name` for a decoder layer."""
    return f"decoder.layers.{index}.{inner}"


def axes_of(name: str) -> Tuple[Optional[int], str, Optional[TensorAxes]]:
    """For a state-dict name: (local decoder-layer index or None, name inside the layer/model, axes or None)."""
    index, inner = split_layer_name(name)
    return index, inner, _lookup(MODEL_ROLES if index is None else LAYER_ROLES, inner)


def is_tied_output_copy(model, name: str) -> bool:
    """The last stage's copy of a tied embedding (PP > 1): not a parameter of its own."""
    return name == "output_layer.weight" and model.share_embeddings_and_output_weights and not model.pre_process
