"""Which modules of each Hugging Face family hold a layer's attention heads and MLP channels: one table entry per
family, read by scoring, the search space, slicing and export alike.

    family = detect(model)                      # UnsupportedModelError (naming the supported ones) otherwise
    layers = layer_sizes(model, family)         # [LayerSizes(prefix="bert.encoder.layer.0", heads=12, ...), ...]

A family entry names, relative to one layer:
- `heads_out`: projections whose output features are `copies` blocks of `[heads, head_dim]` (Q, K, V; GPT-2's
  fused `c_attn` is 3 copies); `kv_out`: the K/V projections of grouped-query attention (`[kv_heads, head_dim]`);
- `heads_in`: the output projection, which reads `[heads, head_dim]` (the head masks sit on its input);
- `ffn_out` / `ffn_in`: the MLP's input projections (gate and up for gated MLPs) and its down projection, which
  reads the post-activation channels (the FFN masks sit on its input);
- `attrs`: module attributes that must follow the new sizes (`num_attention_heads`, `split_size`, ...);
- `config_*`: how the HF config states the FFN width and the head count (see `export.py`).

Hidden size, embeddings, norms, poolers and heads on top are never pruned. GPT-2's `Conv1D` stores weights
transposed (`[in, out]`); `out_dim`/`in_dim` handle both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch.nn as nn

from megatron_prune.errors import UnsupportedModelError


@dataclass(frozen=True)
class Sizes:
    heads: int      # query heads
    kv_heads: int   # K/V heads (== heads without grouped-query attention)
    head_dim: int
    ffn: int


Attr = Tuple[str, str, Callable[[Sizes], int]]  # (module under the layer, attribute, value from the new sizes)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]          # `config.model_type` values
    layers: str                           # the layer list under the base model
    heads_attr: str                       # where a layer keeps its query-head count, or (Llama-style) its head dim
    heads_out: Tuple[Tuple[str, int], ...]
    heads_in: str
    ffn_out: Tuple[str, ...]
    ffn_in: str
    attrs: Tuple[Attr, ...]
    config_ffn: str                       # config field of the FFN width
    config_heads: str                     # "pruned_heads" (HF prunes them at load), "num_attention_heads", or ""
    kv_out: Tuple[str, ...] = ()          # grouped-query attention only
    pruned_heads_module: str = ""         # the module whose `pruned_heads` set HF keeps


def _bert(name: str, model_types: Tuple[str, ...]) -> Family:
    return Family(
        name, model_types, layers="encoder.layer", heads_attr="attention.self.num_attention_heads",
        heads_out=(("attention.self.query", 1), ("attention.self.key", 1), ("attention.self.value", 1)),
        heads_in="attention.output.dense", ffn_out=("intermediate.dense",), ffn_in="output.dense",
        attrs=(("attention.self", "num_attention_heads", lambda s: s.heads),
               ("attention.self", "all_head_size", lambda s: s.heads * s.head_dim)),
        config_ffn="intermediate_size", config_heads="pruned_heads", pruned_heads_module="attention")


def _decoder(name: str, model_types: Tuple[str, ...]) -> Family:
    """Llama-style: grouped-query attention, gated MLP (every KV group keeps the same number of query heads)."""
    return Family(
        name, model_types, layers="layers", heads_attr="self_attn.head_dim",
        heads_out=(("self_attn.q_proj", 1),), kv_out=("self_attn.k_proj", "self_attn.v_proj"),
        heads_in="self_attn.o_proj", ffn_out=("mlp.gate_proj", "mlp.up_proj"), ffn_in="mlp.down_proj",
        attrs=(("self_attn", "num_key_value_groups", lambda s: s.heads // s.kv_heads),
               ("mlp", "intermediate_size", lambda s: s.ffn)),
        config_ffn="intermediate_size", config_heads="num_attention_heads")


FAMILIES: Tuple[Family, ...] = (
    _bert("bert", ("bert",)),
    _bert("roberta", ("roberta",)),
    Family("distilbert", ("distilbert",), layers="transformer.layer", heads_attr="attention.n_heads",
           heads_out=(("attention.q_lin", 1), ("attention.k_lin", 1), ("attention.v_lin", 1)),
           heads_in="attention.out_lin", ffn_out=("ffn.lin1",), ffn_in="ffn.lin2",
           attrs=(("attention", "n_heads", lambda s: s.heads), ("attention", "dim", lambda s: s.heads * s.head_dim)),
           config_ffn="hidden_dim", config_heads="pruned_heads", pruned_heads_module="attention"),
    Family("gpt2", ("gpt2",), layers="h", heads_attr="attn.num_heads", heads_out=(("attn.c_attn", 3),),
           heads_in="attn.c_proj", ffn_out=("mlp.c_fc",), ffn_in="mlp.c_proj",
           attrs=(("attn", "num_heads", lambda s: s.heads), ("attn", "split_size", lambda s: s.heads * s.head_dim)),
           config_ffn="n_inner", config_heads="pruned_heads", pruned_heads_module="attn"),
    # GPT-J derives head_dim from hidden_size / n_head and has no `prune_heads`: pruned heads need the archfile
    Family("gptj", ("gptj",), layers="h", heads_attr="attn.num_attention_heads",
           heads_out=(("attn.q_proj", 1), ("attn.k_proj", 1), ("attn.v_proj", 1)), heads_in="attn.out_proj",
           ffn_out=("mlp.fc_in",), ffn_in="mlp.fc_out",
           attrs=(("attn", "num_attention_heads", lambda s: s.heads),), config_ffn="n_inner", config_heads=""),
    _decoder("llama", ("llama",)),
    _decoder("mistral", ("mistral",)),
    _decoder("qwen2", ("qwen2",)),
    _decoder("qwen3", ("qwen3",)),
)
SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


@dataclass(frozen=True)
class LayerSizes:
    index: int
    prefix: str          # qualified name of the layer module, e.g. "model.layers.3"
    sizes: Sizes

    def name(self, relative: str) -> str:
        return f"{self.prefix}.{relative}"


def is_conv1d(module: nn.Module) -> bool:
    """HF's `Conv1D` (GPT-2): a linear layer with its weight stored `[in, out]`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def out_dim(module: nn.Module) -> int:
    """The weight dim of a projection's output features."""
    return 1 if is_conv1d(module) else 0


def in_features(module: nn.Module) -> int:
    return module.weight.shape[1 - out_dim(module)]


def detect(model: nn.Module) -> Family:
    """The family of a Hugging Face model; an `UnsupportedModelError` naming it and the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    what = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        raise UnsupportedModelError(
            f"gradnas cannot prune {what}: it prunes Hugging Face models of model_type {', '.join(SUPPORTED)} "
            "(BERT/RoBERTa/DistilBERT encoders, GPT-2, GPT-J, Llama/Mistral/Qwen2/Qwen3 decoders)")
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"gradnas cannot prune {what} with cross-attention: only self-attention layers are supported")
    return family


def layer_list(model: nn.Module, family: Family) -> Tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's transformer layers."""
    base = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is base)
    name = f"{prefix}.{family.layers}" if prefix else family.layers
    try:
        layers = model.get_submodule(name)
    except AttributeError:
        raise UnsupportedModelError(f"{type(model).__name__}: no layer list at {name!r} as {family.name} models have") from None
    return name, layers


def layer_sizes(model: nn.Module, family: Family) -> List[LayerSizes]:
    """Every layer's current head count, K/V head count, head dim and FFN width (read from its weights)."""
    prefix, layers = layer_list(model, family)
    out = []
    for i, layer in enumerate(layers):
        p = f"{prefix}.{i}"
        modules = dict(layer.named_modules())
        needed = [r for r, _ in family.heads_out] + list(family.kv_out) + [family.heads_in, *family.ffn_out, family.ffn_in]
        missing = [r for r in needed if r not in modules]
        if missing:
            raise UnsupportedModelError(f"{p} has no {', '.join(missing)}: not the {family.name} layout gradnas knows")
        bad = [r for r in needed if not (isinstance(modules[r], nn.Linear) or is_conv1d(modules[r]))]
        if bad:
            raise UnsupportedModelError(f"{p}: {', '.join(f'{r} ({type(modules[r]).__name__})' for r in bad)} "
                                        "not a Linear layer (quantised or replaced modules cannot be pruned)")
        owner, attr = family.heads_attr.rsplit(".", 1)
        value, width = int(getattr(layer.get_submodule(owner), attr)), in_features(modules[family.heads_in])
        heads, head_dim = (width // value, value) if attr == "head_dim" else (value, width // value)
        kv = modules[family.kv_out[0]].weight.shape[0] // head_dim if family.kv_out else heads
        out.append(LayerSizes(i, p, Sizes(heads, kv, head_dim, in_features(modules[family.ffn_in]))))
    return out


def module_names(layer: LayerSizes, family: Family) -> Dict[str, str]:
    """Role -> qualified module name for one layer (the mask sites: "heads_in", "ffn_in")."""
    return {"heads_in": layer.name(family.heads_in), "ffn_in": layer.name(family.ffn_in)}
