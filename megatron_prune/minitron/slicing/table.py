"""The axis table: for each MCore module role, which dims of which tensors follow which axis.

Read by slicing, by tensor-parallel gathering/sharding, by the analytic counters and by the model check
that refuses unsupported modules. Keys are module paths as MCore names them; the Transformer Engine spec
differs from the local spec only in where a norm lives (`linear_qkv.layer_norm_weight` instead of
`input_layernorm.weight`), so both are listed side by side. Routed experts of a `SequentialMLP` are one
role, `mlp.experts.local_experts.*`: each expert holds the same tensors, and experts are renumbered when
`num_moe_experts` is pruned (kept experts in importance order).

A dim maps to a `Geometry`, an index map (its kind, `geometry.KINDS`: indices and length) applied to the
kept indices of one axis:
  channels   kept indices of the axis as they are             plan        [n']
  gated_rows kept channels of fc1 ([gate; up] if gated)       geometry.gated_rows   [F' or 2F']
  qkv_rows   kept [Q.., K, V] row blocks of kept groups       geometry.qkv_rows     [(G'(q'+2))d]
  head_cols  kept query-head columns of linear_proj           geometry.head_columns [N'd] (MLA: [N'v])
  mla_q_rows   kept heads' rows of MLA's query projection     geometry (MLA)        [N'(qk+r)]
  mla_kv_rows  kept heads' rows of MLA's linear_kv_up_proj    geometry (MLA)        [N'(qk+v)]
  mamba_heads    kept Mamba heads, group by group             plan                  [nh']
  mamba_inner    kept d_inner channels (heads x head dims)    geometry.mamba_inner  [nh'hd']
  mamba_in_rows  kept [z, x, B, C, dt] rows of in_proj        geometry.mamba_in_rows [2nh'hd' + 2ng ds + nh']
  mamba_conv     kept [x, B, C] channels of conv1d            geometry.mamba_conv_channels [nh'hd' + 2ng ds]
The same MLP mechanism serves three roles, specialised only by the axis of its channels: the dense MLP
(`ffn_hidden_size`), each routed expert (`moe_ffn_hidden_size`, ranked per expert) and the shared expert
(`moe_shared_expert_intermediate_size`).
`tp_dim` is the dim Megatron splits across tensor-parallel ranks (column-parallel: output rows;
row-parallel: input columns; vocab-parallel embedding/output: vocabulary rows). It is stated here rather
than read from parameter attributes, which megatron-core omits when `perform_initialization=False`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from megatron_prune.minitron.axes import PER_EXPERT_AXES  # noqa: F401  (axes ranked per routed expert)
from megatron_prune.minitron.slicing.geometry import (  # noqa: F401  (the kinds a Geometry names)
    CHANNELS, GATED_ROWS, HEAD_COLUMNS, MAMBA_CONV, MAMBA_HEADS, MAMBA_IN, MAMBA_INNER, MLA_KV, MLA_Q, QKV,
)


@dataclass(frozen=True)
class Geometry:
    """An index map (`kind`) over the kept indices of one axis."""

    kind: str
    axis: str

    def __repr__(self) -> str:
        return f"{self.kind}({self.axis})"


HIDDEN = Geometry(CHANNELS, "hidden_size")
QKV_ROWS = Geometry(QKV, "num_attention_heads")
HEAD_COLS = Geometry(HEAD_COLUMNS, "num_attention_heads")
MLA_Q_ROWS = Geometry(MLA_Q, "num_attention_heads")
MLA_KV_ROWS = Geometry(MLA_KV, "num_attention_heads")
FFN = Geometry(CHANNELS, "ffn_hidden_size")
EXPERTS = Geometry(CHANNELS, "num_moe_experts")
# Mamba geometries follow both mamba_num_heads and mamba_head_dim (named by the first).
MAMBA_HEAD_ROWS = Geometry(MAMBA_HEADS, "mamba_num_heads")
MAMBA_CHANNELS = Geometry(MAMBA_INNER, "mamba_num_heads")
MAMBA_IN_ROWS = Geometry(MAMBA_IN, "mamba_num_heads")
MAMBA_CONV_CHANNELS = Geometry(MAMBA_CONV, "mamba_num_heads")


@dataclass(frozen=True)
class TensorAxes:
    """How one tensor follows the axes: {dim: geometry}, and its tensor-parallel split."""

    dims: Mapping[int, Geometry] = field(default_factory=dict)
    tp_dim: Optional[int] = None  # None: replicated on every TP rank
    gated: bool = False  # [gate; up] halves are split across TP separately (partition stride 2 when gated)
    segments: Optional[str] = None  # a geometry kind whose segments are split across TP separately (Mamba in_proj, conv1d)


Role = Mapping[str, TensorAxes]  # parameter name -> axes

_NORM: Role = {"weight": TensorAxes({0: HIDDEN}), "bias": TensorAxes({0: HIDDEN})}
_FUSED_NORM: Role = {"layer_norm_weight": TensorAxes({0: HIDDEN}), "layer_norm_bias": TensorAxes({0: HIDDEN})}
_HEAD_DIM_NORM: Role = {"weight": TensorAxes(), "bias": TensorAxes()}  # q/k layernorms act on d (MLA: a lora rank): never pruned
_LORA_NORM: Role = {"layer_norm_weight": TensorAxes(), "layer_norm_bias": TensorAxes()}  # MLA up projections' fused norm


def _mlp(prefix: str, axis: str) -> Dict[str, Role]:
    """An MLP whose channels follow `axis`: fc1 [F(x2 if gated), H] (column-parallel), fc2 [H, F] (row-parallel)."""
    return {
        f"{prefix}.linear_fc1": {
            "weight": TensorAxes({0: Geometry(GATED_ROWS, axis), 1: HIDDEN}, tp_dim=0, gated=True),
            "bias": TensorAxes({0: Geometry(GATED_ROWS, axis)}, tp_dim=0, gated=True),
            **_FUSED_NORM,
        },
        f"{prefix}.linear_fc2": {
            "weight": TensorAxes({0: HIDDEN, 1: Geometry(CHANNELS, axis)}, tp_dim=1),
            "bias": TensorAxes({0: HIDDEN}),
        },
    }


ROUTED_EXPERTS = "mlp.experts.local_experts"  # + ".{e}": one MLP per routed expert (SequentialMLP)

# Roles inside one decoder layer (path relative to the layer): a TransformerLayer (attention, an MLP or an MoE
# layer), or a hybrid model's MambaLayer, attention-only or MLP-only layer.
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
    # MLA (MLASelfAttention, local spec): the query projection (linear_q_proj, or linear_q_down_proj, q_layernorm and
    # linear_q_up_proj when q_lora_rank is set), linear_kv_down_proj [c + r, H] -> kv_layernorm over c ->
    # linear_kv_up_proj, and linear_proj above. The local spec builds every projection column-parallel (the down
    # projections' outputs are gathered); Transformer Engine's duplicates the down projections on every TP rank and
    # fuses q/kv_layernorm into the up projections (`layer_norm_weight` over the lora rank: never pruned).
    "self_attention.linear_q_proj": {"weight": TensorAxes({0: MLA_Q_ROWS, 1: HIDDEN}, tp_dim=0)},
    "self_attention.linear_q_down_proj": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
    "self_attention.linear_q_up_proj": {"weight": TensorAxes({0: MLA_Q_ROWS}, tp_dim=0), **_LORA_NORM},
    "self_attention.linear_kv_down_proj": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
    "self_attention.kv_layernorm": _HEAD_DIM_NORM,
    "self_attention.linear_kv_up_proj": {"weight": TensorAxes({0: MLA_KV_ROWS}, tp_dim=0), **_LORA_NORM},
    "pre_mlp_layernorm": _NORM,
    **_mlp("mlp", "ffn_hidden_size"),
    # MoE layer: router [E, H] (+ bias, aux-loss-free expert_bias [E]), routed experts, shared expert
    "mlp.router": {
        "weight": TensorAxes({0: EXPERTS, 1: HIDDEN}),
        "bias": TensorAxes({0: EXPERTS}),
        "expert_bias": TensorAxes({0: EXPERTS}),
    },
    **_mlp(f"{ROUTED_EXPERTS}.*", "moe_ffn_hidden_size"),
    **_mlp("mlp.shared_experts", "moe_shared_expert_intermediate_size"),
    "mlp.shared_experts": {"gate_weight": TensorAxes({1: HIDDEN})},  # [1, H]: sigmoid gate of the shared expert
    # MambaLayer: pre-norm, then the mixer (TP splits in_proj's [z, x, B, C, dt] and conv1d's [x, B, C] per segment)
    "norm": _NORM,
    "mixer.in_proj": {"weight": TensorAxes({0: MAMBA_IN_ROWS, 1: HIDDEN}, tp_dim=0, segments=MAMBA_IN), **_FUSED_NORM},
    "mixer.conv1d": {"weight": TensorAxes({0: MAMBA_CONV_CHANNELS}, tp_dim=0, segments=MAMBA_CONV),
                     "bias": TensorAxes({0: MAMBA_CONV_CHANNELS}, tp_dim=0, segments=MAMBA_CONV)},
    "mixer": {  # per head [nh]
        "A_log": TensorAxes({0: MAMBA_HEAD_ROWS}, tp_dim=0),
        "D": TensorAxes({0: MAMBA_HEAD_ROWS}, tp_dim=0),
        "dt_bias": TensorAxes({0: MAMBA_HEAD_ROWS}, tp_dim=0),
    },
    "mixer.norm": {"weight": TensorAxes({0: MAMBA_CHANNELS}, tp_dim=0)},  # gated RMSNorm over each group's channels
    "mixer.out_proj": {"weight": TensorAxes({0: HIDDEN, 1: MAMBA_CHANNELS}, tp_dim=1), "bias": TensorAxes({0: HIDDEN})},
}

# Roles outside the decoder layers (path relative to the GPTModel / MambaModel).
MODEL_ROLES: Dict[str, Role] = {
    "embedding.word_embeddings": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
    "embedding.position_embeddings": {"weight": TensorAxes({1: HIDDEN})},
    "decoder.final_layernorm": _NORM,
    "decoder.final_norm": _NORM,  # MambaStack's
    "output_layer": {"weight": TensorAxes({1: HIDDEN}, tp_dim=0)},
}

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(re.escape(ROUTED_EXPERTS) + r"\.(\d+)\.(.+)")


def split_layer_name(name: str) -> Tuple[Optional[int], str]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> (3, ``mlp.linear_fc1.weight``); other names -> (None, name)."""
    m = _LAYER.fullmatch(name)
    return (int(m[1]), m[2]) if m else (None, name)


def layer_name(index: int, inner: str) -> str:
    """Inverse of `split_layer_name` for a decoder layer."""
    return f"decoder.layers.{index}.{inner}"


def split_expert_name(inner: str) -> Tuple[Optional[int], str]:
    """A name inside a layer: ``mlp.experts.local_experts.5.linear_fc2.weight`` -> (5, the name with ``*`` for
    the expert number); other names -> (None, name)."""
    m = _EXPERT.fullmatch(inner)
    return (int(m[1]), f"{ROUTED_EXPERTS}.*.{m[2]}") if m else (None, inner)


def is_routed_expert(inner: str) -> bool:
    """Whether a name inside a layer belongs to one routed expert (numbered, or ``*`` for the number)."""
    return inner.startswith(ROUTED_EXPERTS + ".")


def expert_name(expert: int, role_name: str) -> str:
    """Inverse of `split_expert_name`: the ``*`` of a routed-expert name replaced by `expert`."""
    return role_name.replace(f"{ROUTED_EXPERTS}.*.", f"{ROUTED_EXPERTS}.{expert}.", 1)


def axes_of(name: str) -> Tuple[Optional[int], str, Optional[TensorAxes]]:
    """For a state-dict name: (local decoder-layer index or None, name inside the layer/model, axes or None)."""
    index, inner = split_layer_name(name)
    module, _, param = split_expert_name(inner)[1].rpartition(".")
    return index, inner, (MODEL_ROLES if index is None else LAYER_ROLES).get(module, {}).get(param)


def is_tied_output_copy(model, name: str) -> bool:
    """The last stage's copy of a tied embedding (PP > 1): not a parameter of its own."""
    return name == "output_layer.weight" and model.share_embeddings_and_output_weights and not model.pre_process
