"""Index geometry: which rows/columns of a tensor belong to kept heads, groups and channels.

Pure functions on index tensors, in MCore's notation: N query heads in G groups (q = N/G heads per
group), head dim d, FFN size F; Mamba nh heads of hd channels in ng groups; MLA (multi-latent attention)
heads of qk (no-rope) + r (rope) query/key dims and v value dims. Every function returns a 1-D
LongTensor of indices into the original dimension, in the order the pruned tensor stores them. The
geometry *kinds* at the end pair each index map with its length at given sizes (slicing and counting read
the same kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

Tensor = torch.Tensor


def expand_blocks(blocks: Tensor, block_size: int) -> Tensor:
    """Blocks [k] of `block_size` rows -> rows [k*block_size]: block b covers b*block_size ... +block_size-1."""
    return (blocks.long()[:, None] * block_size + torch.arange(block_size)).reshape(-1)


def qkv_rows(groups: Tensor, heads: Tensor, q: int, d: int) -> Tensor:
    """Rows of a fused `linear_qkv` weight [G*(q+2)*d, H] that survive.

    MCore stores each group as [Q_0 .. Q_{q-1}, K, V] (each d rows), so group g spans blocks
    g*(q+2) ... g*(q+2)+q+1. `groups` [G'] are the kept groups (in output order); `heads` [G', q'] the
    kept query heads *within* each kept group (local indices 0..q-1). Each kept group contributes its
    kept Q blocks, then its K and V blocks. Returns [(G' * (q'+2)) * d].
    """
    groups, heads = groups.long(), heads.long()
    base = groups[:, None] * (q + 2)  # [G', 1]
    blocks = torch.cat([base + heads, base + q, base + q + 1], dim=1)  # [G', q'+2]
    return expand_blocks(blocks.reshape(-1), d)


def head_columns(groups: Tensor, heads: Tensor, q: int, d: int) -> Tensor:
    """Columns of `linear_proj` weight [H, N*d] (query heads, group-major: head = g*q + j) that survive.

    Same `groups` [G'] / `heads` [G', q'] as `qkv_rows`. Returns [G' * q' * d].
    """
    global_heads = groups.long()[:, None] * q + heads.long()  # [G', q']
    return expand_blocks(global_heads.reshape(-1), d)


def gated_rows(channels: Tensor, ffn: int, gated: bool) -> Tensor:
    """Rows of `linear_fc1` weight [F*(2 if gated else 1), H] for kept FFN channels [F'].

    A gated (SwiGLU) fc1 stacks [gate; up]: channel c owns rows c and F + c.
    """
    channels = channels.long()
    return torch.cat([channels, channels + ffn]) if gated else channels


# Mamba mixer (MCore's MambaMixer): nh heads of hd channels in ng groups (nh/ng heads each), state ds;
# d_inner D = nh*hd, channel c of d_inner belongs to head c // hd. `heads` [nh'] are kept heads as global
# indices, group by group (every group keeps nh'/ng), `dims` [hd'] the channels kept within every head.


def mamba_inner(heads: Tensor, dims: Tensor, head_dim: int) -> Tensor:
    """Channels of d_inner kept (rows of the gated norm, columns of `out_proj`): [nh' * hd'], head-major."""
    return (heads.long()[:, None] * head_dim + dims.long()[None, :]).reshape(-1)


def mamba_in_rows(heads: Tensor, dims: Tensor, nheads: int, head_dim: int, bc: int) -> Tensor:
    """Rows of `in_proj` weight [2D + bc + nh, H] kept, bc = 2*ng*ds. MCore stacks [z (D), x (D), B, C (bc), dt
    (nh)]: z and x follow the kept channels, B and C (per group) are all kept, dt follows the kept heads.
    Returns [2 * nh' * hd' + bc + nh']."""
    D, inner = nheads * head_dim, mamba_inner(heads, dims, head_dim)
    return torch.cat([inner, D + inner, 2 * D + torch.arange(bc), 2 * D + bc + heads.long()])


def mamba_conv_channels(heads: Tensor, dims: Tensor, nheads: int, head_dim: int, bc: int) -> Tensor:
    """Channels of `conv1d` (weight [D + bc, 1, k], bias [D + bc]) kept: x's kept channels, then all of B, C."""
    D = nheads * head_dim
    return torch.cat([mamba_inner(heads, dims, head_dim), D + torch.arange(bc)])


# MLA (megatron-core's MLASelfAttention): no query groups (every head has its own K and V, up-projected from a shared
# latent), so heads are ranked as one group (G = 1 in `ModelShape`) and each kept head keeps a block of rows:
#   linear_q_proj / linear_q_up_proj  [N*(qk+r), .]   head h owns rows h*(qk+r) ... (per head [q_nope; q_rope])
#   linear_kv_up_proj                 [N*(qk+v), c]   head h owns rows h*(qk+v) ... (per head [k_nope; value])
#   linear_proj                       [H, N*v]        head h owns columns h*v ...  (`head_columns` with d = v)
# The lora ranks (q_lora_rank, kv_lora_rank c), the shared rope key (r) and the head dims are never pruned.


@dataclass(frozen=True)
class MLADims:
    """The fixed dims of an MLA model (megatron-core's `MLATransformerConfig` names)."""

    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    q_lora_rank: Optional[int]

    @classmethod
    def of(cls, config) -> Optional["MLADims"]:
        """The MLA dims of a config, None when it has no multi-latent attention."""
        if not getattr(config, "multi_latent_attention", False):
            return None
        return cls(config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim, config.kv_lora_rank,
                   config.q_lora_rank)  # fmt: skip

    @property
    def q_rows(self) -> int:
        """Rows of the query projection per head: qk + r."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    @property
    def kv_rows(self) -> int:
        """Rows of `linear_kv_up_proj` per head: qk (key, no rope) + v (value)."""
        return self.qk_head_dim + self.v_head_dim

    @property
    def latent(self) -> int:
        """What MLA inference caches per token: the compressed KV c plus the shared rope key r."""
        return self.kv_lora_rank + self.qk_pos_emb_head_dim


def value_dim(facts) -> int:
    """Channels per head at the input of `linear_proj`: MLA's v_head_dim, else the head dim d (`kv_channels`)."""
    return facts.mla.v_head_dim if facts.mla is not None else facts.kv_channels


# Geometry kinds: each owns the indices a dim keeps (slicing) and their number at given sizes (counting), so
# the two cannot disagree (tests/test_slicing.py checks len(index) == length on every kind).
#   index(kept, shape, axis)  kept(axis) -> kept indices of an axis or None (all, in order); shape: the
#                             original `ModelShape`. Returns the dim's indices, or None (all, in order).
#   length(size, facts, axis) size(axis) -> a kept size; facts: kv_channels, mla (MLADims or None),
#                             gated_linear_unit, mamba_num_groups, mamba_state_dim (a ModelShape or a counting `Sizes`).
CHANNELS, GATED_ROWS, QKV, HEAD_COLUMNS = "channels", "gated_rows", "qkv_rows", "head_cols"
MLA_Q, MLA_KV = "mla_q_rows", "mla_kv_rows"
MAMBA_HEADS, MAMBA_INNER, MAMBA_IN, MAMBA_CONV = "mamba_heads", "mamba_inner", "mamba_in_rows", "mamba_conv"
_N, _G, _NH, _HD = "num_attention_heads", "num_query_groups", "mamba_num_heads", "mamba_head_dim"


@dataclass(frozen=True)
class Kind:
    name: str
    index: Callable[[Callable[[str], Optional[Tensor]], object, str], Optional[Tensor]]
    length: Callable[[Callable[[str], int], object, str], int]


def _gated_index(kept, shape, axis):
    channels = kept(axis)
    return None if channels is None else gated_rows(channels, getattr(shape, axis), shape.gated_linear_unit)


def _qkv_index(kept, shape, axis):
    groups = kept(_G)
    return None if groups is None else qkv_rows(groups, kept(_N), shape.heads_per_group, shape.kv_channels)


def _per_head(per_head: Callable[[object], int]):
    """Index and length of a dim holding `per_head(facts)` entries per kept query head, head by head: the columns
    of `linear_proj` (`value_dim`), the rows of MLA's projections (an `MLADims` property)."""

    def index(kept, shape, axis):
        groups = kept(_G)  # MLA: the heads form one group, [0]
        return None if groups is None else head_columns(groups, kept(_N), shape.heads_per_group, per_head(shape))

    return index, lambda size, facts, axis: size(_N) * per_head(facts)


def _mamba_index(kind: str):
    def index(kept, shape, axis):
        if kept(_NH) is None and kept(_HD) is None:
            return None
        nh, hd = shape.mamba_num_heads, shape.mamba_head_dim
        heads = torch.arange(nh) if kept(_NH) is None else kept(_NH).long()
        dims = torch.arange(hd) if kept(_HD) is None else kept(_HD)
        bc = 2 * shape.mamba_num_groups * shape.mamba_state_dim
        if kind == MAMBA_HEADS:
            return heads
        if kind == MAMBA_INNER:
            return mamba_inner(heads, dims, hd)
        if kind == MAMBA_IN:
            return mamba_in_rows(heads, dims, nh, hd, bc)
        return mamba_conv_channels(heads, dims, nh, hd, bc)

    return index


def _mamba_length(kind: str):
    def length(size, facts, axis):
        heads, inner = size(_NH), size(_NH) * size(_HD)
        bc = 2 * facts.mamba_num_groups * facts.mamba_state_dim  # B and C: never pruned
        return {MAMBA_HEADS: heads, MAMBA_INNER: inner, MAMBA_IN: 2 * inner + bc + heads, MAMBA_CONV: inner + bc}[kind]

    return length


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind(CHANNELS, lambda kept, shape, axis: kept(axis), lambda size, facts, axis: size(axis)),
    Kind(GATED_ROWS, _gated_index, lambda size, facts, axis: size(axis) * (2 if facts.gated_linear_unit else 1)),
    Kind(QKV, _qkv_index, lambda size, facts, axis: (size(_N) + 2 * size(_G)) * facts.kv_channels),
    Kind(HEAD_COLUMNS, *_per_head(value_dim)),
    Kind(MLA_Q, *_per_head(lambda facts: facts.mla.q_rows)),
    Kind(MLA_KV, *_per_head(lambda facts: facts.mla.kv_rows)),
    *(Kind(k, _mamba_index(k), _mamba_length(k)) for k in (MAMBA_HEADS, MAMBA_INNER, MAMBA_IN, MAMBA_CONV)),
)}  # fmt: skip


def mamba_segments(kind: str, nheads: int, head_dim: int, ngroups: int, d_state: int) -> tuple:
    """The segments a Mamba dim stacks, each split over TP ranks on its own (megatron-core's MambaMixer):
    `in_proj` rows [z (D), x (D), B, C (ng*ds each), dt (nh)], `conv1d` channels [x (D), B, C]; D = nh*hd."""
    D, bc = nheads * head_dim, ngroups * d_state
    return {MAMBA_IN: (D, D, bc, bc, nheads), MAMBA_CONV: (D, bc, bc)}[kind]
