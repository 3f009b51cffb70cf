"""Analytic counts of a model at any target sizes: parameters, active parameters, inference memory.

Owns: the model's *inventory* (every tensor of the whole model, all pipeline stages, TP shards joined,
each dim either fixed or following an axis through an index geometry of the axis table) and the lengths
of those geometries at given sizes. It reads the axis table (`slicing/table.py`) for which dims follow
which axis, so a module type the table describes is counted with no change here. It does not own which
layers survive or how tensors are sliced.

Two sources give the same inventory: `inventory_of(model, ctx)` reads a live model (exact for whatever
it holds: TE or local spec, biases, qk norms, a block spec without final norm), and
`inventory_of_config(config, vocab_size, ...)` states the tensors Megatron builds for a dense GPT config
(local or TE spec), for counting a config without building it.

Memory (MB = 2**20 bytes) = parameters * dtype_bytes + inference state. The state a layer keeps is looked
up in `INFERENCE_STATE` by a role it holds: attention keeps K and V of every query group per token (KV
cache, assuming global attention in every layer: an upper bound with sliding windows). A Mamba mixer will
add its per-sequence conv and SSM state there; MoE expert tensors will make `active_params` differ from
`params` (top-k of E experts). For dense models active == total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from megatron_prune.runtime.parallel import ParallelContext
from megatron_prune.slicing.table import FC1_ROWS, FFN, HEAD_COLS, HIDDEN, QKV_ROWS, axes_of, is_tied_output_copy, layer_name

Dim = Union[int, str]  # a fixed length, or a geometry of the axis table
Template = Tuple[Dim, ...]
MB = 2**20

# Inference state per layer, by a role (a tensor name inside the layer) that keeps it:
# sizes -> (elements per token of every sequence, elements per sequence), stored in kv_cache_dtype_bytes.
INFERENCE_STATE: Dict[str, Callable[["Sizes"], Tuple[int, int]]] = {
    "self_attention.linear_qkv.weight": lambda s: (2 * s.num_query_groups * s.kv_channels, 0),  # K and V
}


@dataclass(frozen=True)
class Sizes:
    """The sizes a count is taken at (target sizes plus the fixed facts the geometries need)."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    num_layers: int
    kv_channels: int
    gated_linear_unit: bool

    def length(self, geometry: str) -> int:
        """Length of a geometry's dim (the number of indices it keeps) at these sizes."""
        if geometry == HIDDEN:
            return self.hidden_size
        if geometry == QKV_ROWS:  # per group [Q.., K, V]
            return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels
        if geometry == HEAD_COLS:
            return self.num_attention_heads * self.kv_channels
        if geometry == FC1_ROWS:  # [gate; up] when gated
            return self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)
        if geometry == FFN:
            return self.ffn_hidden_size
        raise KeyError(f"no length for geometry {geometry!r}")


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
    """What `memory_mb` assumes: weights in `dtype_bytes`, a KV cache for `batch_size` x `seq_length` tokens."""

    seq_length: int = 4096
    batch_size: int = 1
    dtype_bytes: int = 2
    kv_cache_dtype_bytes: Optional[int] = None


@dataclass(frozen=True)
class Inventory:
    """Every tensor of a whole model as {name: template}. Decoder layers all hold the same tensors, so one
    layer's templates (names inside the layer) stand for each of the `num_layers`."""

    model: Mapping[str, Template]  # outside the decoder layers: embeddings, final norm, untied output layer
    layer: Mapping[str, Template]
    kv_channels: int
    gated_linear_unit: bool

    def sizes(self, target: Mapping[str, int]) -> Sizes:
        return Sizes(kv_channels=self.kv_channels, gated_linear_unit=self.gated_linear_unit, **target)

    def count(self, target: Mapping[str, int], memory: MemorySpec = MemorySpec()) -> Counts:
        """Counts of the model pruned to `target` (complete sizes: hidden_size ... num_layers)."""
        s = self.sizes(target)
        per_layer = sum(_numel(t, s) for t in self.layer.values())
        params = sum(_numel(t, s) for t in self.model.values()) + s.num_layers * per_layer
        per_token = per_sequence = 0
        for role, state in INFERENCE_STATE.items():
            if role in self.layer:
                token, sequence = state(s)
                per_token, per_sequence = per_token + token, per_sequence + sequence
        state_elements = s.num_layers * memory.batch_size * (per_token * memory.seq_length + per_sequence)
        kv_bytes = memory.kv_cache_dtype_bytes or memory.dtype_bytes
        return Counts(params, params, (params * memory.dtype_bytes + state_elements * kv_bytes) / MB)


def _numel(template: Template, sizes: Sizes) -> int:
    return math.prod(d if isinstance(d, int) else sizes.length(d) for d in template)


def template(name: str, shape: Tuple[int, ...]) -> Template:
    """A tensor's logical shape with each dim the axis table assigns replaced by its geometry."""
    _, _, axes = axes_of(name)
    if axes is None:
        raise KeyError(f"tensor '{name}' is not in the axis table")
    return tuple(axes.dims.get(i, n) for i, n in enumerate(shape))


def inventory_of(model: torch.nn.Module, ctx: ParallelContext) -> Inventory:
    """The inventory of the whole model this rank's stage belongs to (a gather over pipeline stages).

    Shapes are logical: a dim split across TP ranks counts tp_size times its local length. Raises
    ValueError if decoder layers hold different tensors (counts would depend on which layers survive).
    """
    parts = {}
    for name, p in model.named_parameters():
        if is_tied_output_copy(model, name):
            continue
        shape = list(p.shape)
        axes = axes_of(name)[2]
        if axes is not None and axes.tp_dim is not None:
            shape[axes.tp_dim] *= ctx.tp_size
        parts[name] = tuple(shape)
    numbers = [int(layer.layer_number) for layer in model.decoder.layers]
    local_model, local_layers = {}, {}
    for name, shape in parts.items():
        index, inner, _ = axes_of(name)
        if index is None:
            local_model[name] = template(name, shape)
        else:
            local_layers.setdefault(numbers[index], {})[inner] = template(layer_name(0, inner), shape)
    whole_model, layers = {}, {}
    for stage_model, stage_layers in ctx.gather_over_pp((local_model, local_layers)):
        whole_model.update(stage_model)
        layers.update(stage_layers)
    distinct = {tuple(sorted(t.items())) for t in layers.values()}
    if len(distinct) > 1:
        first = layers[min(layers)]
        odd = next(n for n in sorted(layers) if layers[n] != first)
        raise ValueError(f"decoder layer {odd} holds different tensors than layer {min(layers)}: counts need identical layers")
    cfg = model.config
    return Inventory(whole_model, layers[min(layers)], _kv_channels(cfg), bool(cfg.gated_linear_unit))


def inventory_of_config(config, vocab_size: int, share_embeddings_and_output_weights: bool = True,
                        position_embedding_type: str = "rope", max_sequence_length: int = 0) -> Inventory:  # fmt: skip
    """The inventory of the dense GPTModel Megatron builds from `config` (local or TE layer spec with the
    default final norm), without building it. The tensor shapes are stated here; tests check them
    against models Megatron builds."""
    H, F, N, d = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, _kv_channels(config)
    G = config.num_query_groups or N
    norm = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    bias = config.add_bias_linear
    qkv = (N + 2 * G) * d
    fc1 = F * (2 if config.gated_linear_unit else 1)
    layer = {f"{m}.{p}": (H,) for m in ("input_layernorm", "pre_mlp_layernorm") for p in norm}
    layer.update({
        "self_attention.linear_qkv.weight": (qkv, H),
        "self_attention.linear_proj.weight": (H, N * d),
        "mlp.linear_fc1.weight": (fc1, H),
        "mlp.linear_fc2.weight": (H, F),
    })  # fmt: skip
    if bias or config.add_qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (qkv,)
    if bias:
        layer.update({"self_attention.linear_proj.bias": (H,), "mlp.linear_fc1.bias": (fc1,), "mlp.linear_fc2.bias": (H,)})
    if config.qk_layernorm:
        layer.update({f"self_attention.{m}.{p}": (d,) for m in ("q_layernorm", "k_layernorm") for p in norm})
    model = {"embedding.word_embeddings.weight": (vocab_size, H)}
    if position_embedding_type == "learned_absolute":
        model["embedding.position_embeddings.weight"] = (max_sequence_length, H)
    model.update({f"decoder.final_layernorm.{p}": (H,) for p in norm})
    if not share_embeddings_and_output_weights:
        model["output_layer.weight"] = (vocab_size, H)
    return Inventory(
        model={n: template(n, s) for n, s in model.items()},
        layer={n: template(layer_name(0, n), s) for n, s in layer.items()},
        kv_channels=d,
        gated_linear_unit=bool(config.gated_linear_unit),
    )


def _kv_channels(config) -> int:
    return config.kv_channels or config.hidden_size // config.num_attention_heads
