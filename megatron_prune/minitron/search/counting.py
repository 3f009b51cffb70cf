"""Analytic counts of a model at any target sizes: parameters, active parameters, inference memory.

Owns: the model's *inventory* (every tensor of the whole model, all pipeline stages, TP shards joined,
each dim either fixed or following an axis through an index geometry of the axis table) and the lengths
of those geometries at given sizes. It reads the axis table (`slicing/table.py`) for which dims follow
which axis, so a module type the table describes is counted with no change here. It does not own which
layers survive or how tensors are sliced.

Layers may differ (dense and MoE layers mixed): the inventory holds each distinct layer content once (a
*kind*) and the kind of every layer, so a count is exact for a given set of surviving layers. Routed-expert
tensors are listed once per kind (every expert holds the same tensors) and count `num_moe_experts` times,
`min(moe_router_topk, num_moe_experts)` times in `active_params` (a token runs through its top-k experts,
the router and the shared expert); for dense models active == total.

Two sources give the same inventory: `inventory_of(model, ctx)` reads a live model (exact for whatever
it holds: TE or local spec, biases, qk norms, a block spec without final norm), and
`inventory_of_config(config, vocab_size, ...)` states the tensors Megatron builds for a GPT config, dense
or MoE (local or TE spec), for counting a config without building it (hybrid Mamba models: read the model).

Memory (MB = 2**20 bytes) = parameters * dtype_bytes + inference state. The state a layer keeps is looked
up in `INFERENCE_STATE` by a role it holds: attention keeps K and V of every query group per token (KV
cache, assuming global attention in every layer: an upper bound with sliding windows; multi-latent attention
keeps its compressed latent, kv_lora_rank + qk_pos_emb_head_dim values per token, whatever the heads, as
DeepSeek-style MLA serving and megatron-core's dynamic engine with `cache_mla_latents` do: megatron-core's static
engine caches the up-projected K and V of every head instead, N (qk + r + v) per token), stored in
`kv_cache_dtype_bytes`; a Mamba mixer keeps, per sequence, its convolution window ((D + 2 ng ds) x (k - 1))
and its SSM state (nh x hd x ds), stored in `mamba_state_dtype_bytes`. Both default to `dtype_bytes`, as
the reference counts them (ModelOpt counts the Mamba state at the weights' dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_prune.minitron.axes import default_kv_channels
from megatron_prune.minitron.config import moe_layer_pattern
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.geometry import KINDS, MLADims
from megatron_prune.minitron.slicing.tensor_parallel import split_size
from megatron_prune.minitron.slicing.table import (
    MAMBA_CHANNELS, MAMBA_CONV_CHANNELS, ROUTED_EXPERTS, Geometry, axes_of, is_routed_expert, is_tied_output_copy, layer_name,
    split_expert_name,
)

Dim = Union[int, Geometry]  # a fixed length, or a geometry of the axis table
Template = Tuple[Dim, ...]
MB = 2**20

# Inference state per layer, by a role (a tensor name inside the layer) that keeps it: (what it is, sizes ->
# elements). The KV cache holds its elements per token of every sequence, the Mamba state per sequence.
KV_CACHE, MAMBA_STATE = "kv_cache", "mamba_state"
INFERENCE_STATE: Dict[str, Tuple[str, Callable[["Sizes"], int]]] = {
    "self_attention.linear_qkv.weight": (KV_CACHE, lambda s: 2 * s.size("num_query_groups") * s.kv_channels),  # K, V
    "self_attention.linear_kv_down_proj.weight": (KV_CACHE, lambda s: s.mla.latent),  # MLA: the compressed KV latent
    "mixer.in_proj.weight": (MAMBA_STATE, lambda s: s.length(MAMBA_CONV_CHANNELS) * (s.mamba_conv_kernel - 1)  # conv
                                                    + s.length(MAMBA_CHANNELS) * s.mamba_state_dim),  # SSM state
}


@dataclass(frozen=True)
class Sizes:
    """The sizes a count is taken at: complete target sizes plus the fixed facts the geometries need."""

    sizes: Mapping[str, int]
    kv_channels: int
    gated_linear_unit: bool
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    mamba_conv_kernel: int = 0
    mla: Optional[MLADims] = None

    def size(self, axis: str) -> int:
        return self.sizes[axis]

    def length(self, geometry: Geometry) -> int:
        """Length of a geometry's dim (the number of indices it keeps) at these sizes: its kind's."""
        return KINDS[geometry.kind].length(self.size, self, geometry.axis)


@dataclass(frozen=True)
class Counts:
    """The analytic counts of one model size; `get(budget)` reads one by its budget name."""

    params: int
    active_params: int
    memory_mb: float

    def get(self, budget: str) -> float:
        return getattr(self, budget)


@dataclass(frozen=True)
class MemorySpec:
    """What `memory_mb` assumes: weights in `dtype_bytes`, a KV cache for `batch_size` x `seq_length` tokens in
    `kv_cache_dtype_bytes`, the Mamba conv and SSM state of `batch_size` sequences in `mamba_state_dtype_bytes`
    (both None: `dtype_bytes`)."""

    seq_length: int = 4096
    batch_size: int = 1
    dtype_bytes: int = 2
    kv_cache_dtype_bytes: Optional[int] = None
    mamba_state_dtype_bytes: Optional[int] = None

    def state_bytes(self, kind: str, elements: int) -> int:
        """Bytes of `elements` of inference state of `kind` (per token for the KV cache, per sequence for Mamba)."""
        if kind == KV_CACHE:
            return self.batch_size * self.seq_length * elements * (self.kv_cache_dtype_bytes or self.dtype_bytes)
        return self.batch_size * elements * (self.mamba_state_dtype_bytes or self.dtype_bytes)


@dataclass(frozen=True)
class Inventory:
    """Every tensor of a whole model as {name: template}: those outside the decoder layers, and each distinct
    decoder-layer content (`kinds`, names inside the layer, routed experts once as ``...local_experts.*...``)
    with the kind of every layer 1..L (`layer_kinds`)."""

    model: Mapping[str, Template]  # outside the decoder layers: embeddings, final norm, untied output layer
    kinds: Tuple[Mapping[str, Template], ...]
    layer_kinds: Tuple[int, ...]
    kv_channels: int
    gated_linear_unit: bool
    moe_router_topk: int = 0
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    mamba_conv_kernel: int = 0
    mla: Optional[MLADims] = None

    def sizes(self, target: Mapping[str, int]) -> Sizes:
        return Sizes(dict(target), self.kv_channels, self.gated_linear_unit, self.mamba_num_groups, self.mamba_state_dim,
                     self.mamba_conv_kernel, self.mla)  # fmt: skip

    @property
    def uniform(self) -> bool:
        """Whether every layer holds the same tensors (then which layers survive does not change a count)."""
        return len(set(self.layer_kinds)) == 1

    def surviving(self, num_layers: int, kept_layers: Optional[Sequence[int]] = None) -> List[int]:
        """The layers (1-indexed) a count of `num_layers` layers covers: `kept_layers` if given, else all of
        them or, when every layer is alike, the first `num_layers`. Raises ValueError when layers differ and
        it is not known which survive."""
        total = len(self.layer_kinds)
        if kept_layers is not None:
            if len(kept_layers) != num_layers:
                raise ValueError(f"kept_layers {list(kept_layers)} does not hold num_layers={num_layers} layers")
            return list(kept_layers)
        if num_layers == total or self.uniform:
            return list(range(1, num_layers + 1))
        raise ValueError(f"the layers differ (kinds {list(self.layer_kinds)}): which {total - num_layers} of them are "
                         "dropped decides the count; give kept_layers")  # fmt: skip

    def count(self, target: Mapping[str, int], memory: MemorySpec = MemorySpec(),
              kept_layers: Optional[Sequence[int]] = None) -> Counts:  # fmt: skip
        """Counts of the model pruned to `target` (complete sizes), keeping `kept_layers` (see `surviving`)."""
        s = self.sizes(target)
        per_kind = [self._layer(kind, s, memory) for kind in self.kinds]
        layers = [per_kind[self.layer_kinds[n - 1]] for n in self.surviving(s.size("num_layers"), kept_layers)]
        base = self._base(s)
        params, active = base + sum(p for p, _, _ in layers), base + sum(a for _, a, _ in layers)
        return Counts(params, active, (params * memory.dtype_bytes + sum(st for _, _, st in layers)) / MB)

    def smallest(self, target: Mapping[str, int], memory: MemorySpec = MemorySpec()) -> Counts:
        """A lower bound of `count(target, ...)` over every choice of surviving layers: each count with its
        smallest layers kept. Exact when every layer is alike."""
        if self.uniform or target["num_layers"] == len(self.layer_kinds):
            return self.count(target, memory)
        s, n = self.sizes(target), target["num_layers"]
        rows = [self._layer(self.kinds[k], s, memory) for k in self.layer_kinds]
        base = self._base(s)
        params, active = (base + sum(sorted(r[i] for r in rows)[:n]) for i in range(2))
        layer_bytes = sum(sorted(r[0] * memory.dtype_bytes + r[2] for r in rows)[:n])
        return Counts(params, active, (base * memory.dtype_bytes + layer_bytes) / MB)

    def _base(self, s: Sizes) -> int:
        """Parameters outside the decoder layers at sizes `s`."""
        return sum(_numel(t, s) for t in self.model.values())

    def _layer(self, kind: Mapping[str, Template], s: Sizes, memory: MemorySpec) -> Tuple[int, int, int]:
        """(parameters, active parameters, inference-state bytes) of one layer of `kind` at sizes `s`."""
        experts = s.sizes.get("num_moe_experts", 0)
        params = active = 0
        for name, t in kind.items():
            n = _numel(t, s)
            routed = is_routed_expert(name)
            params += n * (experts if routed else 1)
            active += n * (min(self.moe_router_topk, experts) if routed else 1)
        state = sum(memory.state_bytes(what, elements(s)) for role, (what, elements) in INFERENCE_STATE.items() if role in kind)
        return params, active, state


def _numel(template: Template, sizes: Sizes) -> int:
    return math.prod(d if isinstance(d, int) else sizes.length(d) for d in template)


def template(name: str, shape: Tuple[int, ...]) -> Template:
    """A tensor's logical shape with each dim the axis table assigns replaced by its geometry."""
    _, _, axes = axes_of(name)
    if axes is None:
        raise KeyError(f"tensor '{name}' is not in the axis table")
    return tuple(axes.dims.get(i, n) for i, n in enumerate(shape))


def _group(layers: Mapping[int, Mapping[str, Template]]) -> Tuple[Tuple[Mapping[str, Template], ...], Tuple[int, ...]]:
    """Distinct layer contents (in order of first appearance) and the kind of each layer 1..L."""
    kinds: List[Mapping[str, Template]] = []
    layer_kinds = []
    for n in sorted(layers):
        content = dict(sorted(layers[n].items()))
        if content not in kinds:
            kinds.append(content)
        layer_kinds.append(kinds.index(content))
    return tuple(kinds), tuple(layer_kinds)


def inventory_of(model: torch.nn.Module, ctx: ParallelContext) -> Inventory:
    """The inventory of the whole model this rank's stage belongs to (a gather over pipeline stages).

    Shapes are logical: a dim split across TP (routed experts: expert-TP) ranks counts their number times its
    local length.
    """
    numbers = [int(layer.layer_number) for layer in model.decoder.layers]
    local_model, local_layers = {}, {}
    for name, p in model.named_parameters():
        if is_tied_output_copy(model, name):
            continue
        shape = list(p.shape)
        index, inner, axes = axes_of(name)
        if axes is not None and axes.tp_dim is not None:
            shape[axes.tp_dim] *= split_size(name, ctx)
        if index is None:
            local_model[name] = template(name, shape)
            continue
        expert, inner = split_expert_name(inner)  # every routed expert holds the same tensors: listed once
        layer = local_layers.setdefault(numbers[index], {})
        t = template(layer_name(0, inner), shape)
        if layer.setdefault(inner, t) != t:
            raise ValueError(f"routed experts of layer {numbers[index]} differ in '{inner}'")
    kernels = [layer.mixer.conv1d.kernel_size[0] for layer in model.decoder.layers if hasattr(layer, "mixer")]
    whole_model, layers, kernel = {}, {}, 0
    for stage_model, stage_layers, stage_kernel in ctx.gather_over_pp((local_model, local_layers, max(kernels, default=0))):
        whole_model.update(stage_model)
        layers.update(stage_layers)
        kernel = max(kernel, stage_kernel)  # Mamba's conv1d width (0 on stages without Mamba layers)
    cfg = model.config
    kinds, layer_kinds = _group(layers)
    topk = cfg.moe_router_topk if cfg.num_moe_experts else 0
    mamba = (cfg.mamba_num_groups, cfg.mamba_state_dim, kernel) if any("mixer.in_proj.weight" in k for k in kinds) else (0, 0, 0)
    return Inventory(whole_model, kinds, layer_kinds, default_kv_channels(cfg), bool(cfg.gated_linear_unit), topk, *mamba,
                     mla=MLADims.of(cfg))  # fmt: skip


def inventory_of_config(config, vocab_size: int, share_embeddings_and_output_weights: bool = True,
                        position_embedding_type: str = "rope", max_sequence_length: int = 0) -> Inventory:  # fmt: skip
    """The inventory of the GPTModel Megatron builds from `config` (dense or MoE layers, GQA or multi-latent
    attention, local or TE layer spec with the default final norm), without building it. The tensor shapes are stated here; tests check
    them against models Megatron builds."""
    H, F, N, d = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, default_kv_channels(config)
    G = config.num_query_groups or N
    norm = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    bias = config.add_bias_linear
    qkv = (N + 2 * G) * d

    def mlp(prefix: str, size: int) -> Dict[str, Tuple[int, ...]]:
        fc1 = size * (2 if config.gated_linear_unit else 1)
        out = {f"{prefix}.linear_fc1.weight": (fc1, H), f"{prefix}.linear_fc2.weight": (H, size)}
        if bias:
            out.update({f"{prefix}.linear_fc1.bias": (fc1,), f"{prefix}.linear_fc2.bias": (H,)})
        return out

    layer = {f"{m}.{p}": (H,) for m in ("input_layernorm", "pre_mlp_layernorm") for p in norm}
    mla = MLADims.of(config)
    if mla is None:
        layer.update({"self_attention.linear_qkv.weight": (qkv, H), "self_attention.linear_proj.weight": (H, N * d)})
        if bias or config.add_qkv_bias:
            layer["self_attention.linear_qkv.bias"] = (qkv,)
        if config.qk_layernorm:
            layer.update({f"self_attention.{m}.{p}": (d,) for m in ("q_layernorm", "k_layernorm") for p in norm})
    else:
        layer.update(_mla_tensors(mla, H, N, norm if config.qk_layernorm else ()))
    if bias:
        layer["self_attention.linear_proj.bias"] = (H,)
    dense = {**layer, **mlp("mlp", F)}
    moe = dict(layer)
    if config.num_moe_experts:
        E, Fs = config.num_moe_experts, config.moe_shared_expert_intermediate_size
        moe["mlp.router.weight"] = (E, H)
        if bias:
            moe["mlp.router.bias"] = (E,)
        moe.update(mlp(f"{ROUTED_EXPERTS}.*", config.moe_ffn_hidden_size or F))
        if Fs:
            moe.update(mlp("mlp.shared_experts", Fs))
            if config.moe_shared_expert_gate:
                moe["mlp.shared_experts.gate_weight"] = (1, H)
    model = {"embedding.word_embeddings.weight": (vocab_size, H)}
    if position_embedding_type == "learned_absolute":
        model["embedding.position_embeddings.weight"] = (max_sequence_length, H)
    model.update({f"decoder.final_layernorm.{p}": (H,) for p in norm})
    if not share_embeddings_and_output_weights:
        model["output_layer.weight"] = (vocab_size, H)
    layers = {n: {k: template(layer_name(0, k), s) for k, s in (moe if is_moe else dense).items()}
              for n, is_moe in enumerate(moe_layer_pattern(config), start=1)}  # fmt: skip
    kinds, layer_kinds = _group(layers)
    return Inventory(model={n: template(n, s) for n, s in model.items()}, kinds=kinds, layer_kinds=layer_kinds, kv_channels=d,
                     gated_linear_unit=bool(config.gated_linear_unit),
                     moe_router_topk=config.moe_router_topk if config.num_moe_experts else 0, mla=mla)  # fmt: skip


def _mla_tensors(mla: MLADims, H: int, N: int, norm: Tuple[str, ...]) -> Dict[str, Tuple[int, ...]]:
    """The tensors of megatron-core's MLASelfAttention (local spec; no linear biases: MLA builds its projections
    without): `norm`, the parameters of q/kv_layernorm (with qk_layernorm, else identities)."""
    a = "self_attention"
    out = {f"{a}.linear_kv_down_proj.weight": (mla.kv_lora_rank + mla.qk_pos_emb_head_dim, H),
           f"{a}.linear_kv_up_proj.weight": (N * mla.kv_rows, mla.kv_lora_rank),
           f"{a}.linear_proj.weight": (H, N * mla.v_head_dim)}  # fmt: skip
    out.update({f"{a}.kv_layernorm.{p}": (mla.kv_lora_rank,) for p in norm})
    if mla.q_lora_rank is None:
        out[f"{a}.linear_q_proj.weight"] = (N * mla.q_rows, H)
    else:
        out[f"{a}.linear_q_down_proj.weight"] = (mla.q_lora_rank, H)
        out[f"{a}.linear_q_up_proj.weight"] = (N * mla.q_rows, mla.q_lora_rank)
        out.update({f"{a}.q_layernorm.{p}": (mla.q_lora_rank,) for p in norm})
    return out
