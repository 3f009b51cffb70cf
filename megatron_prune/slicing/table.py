"""The axis table: for each MCore module role, which dims of which tensors follow which axis.

Read by slicing (and by the model check that refuses unsupported modules). Keys are module paths as
MCore names them; the Transformer Engine spec differs from the local spec only in where a norm lives
(`linear_qkv.layer_norm_weight` instead of `input_layernorm.weight`), so both are listed side by side.

A dim maps to an index geometry:
  HIDDEN     kept hidden channels                           plan.hidden              [H']
  QKV_ROWS   kept [Q.., K, V] row blocks of kept groups     geometry.qkv_rows        [(G'(q'+2))d]
  HEAD_COLS  kept query-head columns of linear_proj         geometry.head_columns    [N'd]
  FC1_ROWS   kept FFN channels of fc1 ([gate; up] if gated) geometry.gated_rows      [F' or 2F']
  FFN        kept FFN channels (fc2 columns)                plan.layers[n].ffn       [F']
"""

from __future__ import annotations

from typing import Dict, Mapping

HIDDEN, QKV_ROWS, HEAD_COLS, FC1_ROWS, FFN = "hidden", "qkv_rows", "head_cols", "fc1_rows", "ffn"

Dims = Mapping[int, str]  # tensor dim -> geometry
Role = Mapping[str, Dims]  # parameter name -> dims

_NORM: Role = {"weight": {0: HIDDEN}, "bias": {0: HIDDEN}}
_UNPRUNED_NORM: Role = {"weight": {}, "bias": {}}  # q/k layernorms act on the head dim, never pruned
_FUSED_NORM: Role = {"layer_norm_weight": {0: HIDDEN}, "layer_norm_bias": {0: HIDDEN}}

# Roles inside one TransformerLayer (path relative to the layer).
LAYER_ROLES: Dict[str, Role] = {
    "input_layernorm": _NORM,
    "self_attention.linear_qkv": {"weight": {0: QKV_ROWS, 1: HIDDEN}, "bias": {0: QKV_ROWS}, **_FUSED_NORM},
    "self_attention.q_layernorm": _UNPRUNED_NORM,
    "self_attention.k_layernorm": _UNPRUNED_NORM,
    "self_attention.linear_proj": {"weight": {0: HIDDEN, 1: HEAD_COLS}, "bias": {0: HIDDEN}},
    "pre_mlp_layernorm": _NORM,
    "mlp.linear_fc1": {"weight": {0: FC1_ROWS, 1: HIDDEN}, "bias": {0: FC1_ROWS}, **_FUSED_NORM},
    "mlp.linear_fc2": {"weight": {0: HIDDEN, 1: FFN}, "bias": {0: HIDDEN}},
}

# Roles outside the decoder layers (path relative to the GPTModel).
MODEL_ROLES: Dict[str, Role] = {
    "embedding.word_embeddings": {"weight": {1: HIDDEN}},
    "embedding.position_embeddings": {"weight": {1: HIDDEN}},
    "decoder.final_layernorm": _NORM,
    "output_layer": {"weight": {1: HIDDEN}},
}


def lookup(roles: Mapping[str, Role], name: str) -> Dims | None:
    """Dims for a parameter name like ``mlp.linear_fc1.weight`` (None if no role owns it)."""
    module, _, param = name.rpartition(".")
    role = roles.get(module)
    return None if role is None else role.get(param)
