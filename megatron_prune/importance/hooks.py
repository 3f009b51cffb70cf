"""Hooks: route activations of MCore modules into the statistics, and nothing more.

Owns: *where* each statistic is observed (`LAYER_SITES`) and the hook lifecycle. The math lives in
statistics.py. Keys are ``layer{global_layer_number}/{site}``, so what a rank collects is independent of
how layers are spread over pipeline stages.

Sites, per TransformerLayer (MCore tensors are [S, B, C]):
  qkv_in   normalised input of `self_attention.linear_qkv`  -> hidden_size          [H]
  fc1_in   normalised input of `mlp.linear_fc1`             -> hidden_size          [H]
  proj_in  input of `self_attention.linear_proj`            -> num_attention_heads  [N*d]
  fc2_in   input of `mlp.linear_fc2`                        -> ffn_hidden_size      [F]
  block    (layer input, layer output)                      -> num_layers           []
"Normalised input" is what the pre-sublayer norm produced. With the local spec the norm is a separate
module, so the linear's input already is its output. With Transformer Engine specs the norm is fused into
the linear (`layer_norm_weight`), so it is recomputed here from the linear's input and the norm's
parameters: one mapping serves both specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from megatron_prune.importance import statistics as S
from megatron_prune.slicing.table import LAYER_ROLES


@dataclass(frozen=True)
class HookSite:
    name: str  # statistic name, the suffix of the store key
    module: str  # path inside a TransformerLayer; "" is the layer itself
    kind: str  # "input" | "normed_input" | "block"

    @property
    def tp_partitioned(self) -> bool:
        """Input of a row-parallel linear (the table splits its weight's input dim): each TP rank sees
        its own slice of the channels."""
        return self.kind != "block" and LAYER_ROLES[self.module]["weight"].tp_dim == 1


LAYER_SITES: Tuple[HookSite, ...] = (
    HookSite("qkv_in", "self_attention.linear_qkv", "normed_input"),
    HookSite("fc1_in", "mlp.linear_fc1", "normed_input"),
    HookSite("proj_in", "self_attention.linear_proj", "input"),
    HookSite("fc2_in", "mlp.linear_fc2", "input"),
    HookSite("block", "", "block"),
)
TP_PARTITIONED_SITES = frozenset(site.name for site in LAYER_SITES if site.tp_partitioned)


def stat_key(layer_number: int, site: str) -> str:
    return f"layer{layer_number}/{site}"


def parse_stat_key(key: str) -> Tuple[int, str]:
    """Inverse of `stat_key`: ``"layer3/fc2_in"`` -> (3, ``"fc2_in"``)."""
    layer, _, site = key.partition("/")
    return int(layer[len("layer") :]), site


def decoder_layers(model: torch.nn.Module) -> Iterator[Tuple[int, torch.nn.Module]]:
    """(global 1-indexed layer number, layer) for the decoder layers this rank holds."""
    for layer in model.decoder.layers:
        yield int(layer.layer_number), layer


def _normalise(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-sublayer norm's output: recomputed for TE fused norm+linear, else x itself."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return x
    cfg = linear.config
    zc = getattr(cfg, "layernorm_zero_centered_gamma", False)
    if cfg.normalization == "RMSNorm":
        return S.rms_norm(x, weight, cfg.layernorm_epsilon, zc)
    return S.layer_norm(x, weight, getattr(linear, "layer_norm_bias", None), cfg.layernorm_epsilon, zc)


def register_hooks(model: torch.nn.Module, store: S.StatStore) -> List[torch.utils.hooks.RemovableHandle]:
    """Attach one hook per (layer, site); accumulators start at zero so every replica holds every key."""
    handles = []
    first = True
    for number, layer in decoder_layers(model):
        device = next(layer.parameters()).device  # accumulate where activations live: no sync per call
        for site in LAYER_SITES:
            key = stat_key(number, site.name)
            if site.kind == "block":
                store.add(key, torch.zeros((), device=device))
                handles.append(layer.register_forward_hook(_block_hook(store, key, count=first), with_kwargs=True))
                continue
            module = layer.get_submodule(site.module)
            store.add(key, torch.zeros(module.weight.shape[1], device=device))
            fn = _input_hook(store, key, normalise=site.kind == "normed_input")
            handles.append(module.register_forward_pre_hook(fn))
        first = False
    return handles


def _input_hook(store: S.StatStore, key: str, normalise: bool) -> Callable:
    def hook(module, args):
        x = args[0]
        store.add(key, S.channel_sum_sq(_normalise(module, x) if normalise else x))

    return hook


def _block_hook(store: S.StatStore, key: str, count: bool) -> Callable:
    def hook(module, args, kwargs, output):
        x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x_out = output[0] if isinstance(output, (tuple, list)) else output
        store.add(key, S.block_influence(x_in, x_out))
        if count:
            store.calls += 1

    return hook


def collect_statistics(model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None]) -> S.StatStore:
    """Run `forward_loop(model)` in eval mode without gradients and return this rank's raw statistics."""
    store = S.StatStore()
    handles = register_hooks(model, store)
    modes = {m: m.training for m in model.modules()}  # restored module by module, as the user set them
    model.eval()
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return store


def local_layer_numbers(model: torch.nn.Module) -> Dict[int, int]:
    """{global layer number: position in this rank's decoder.layers}."""
    return {number: i for i, (number, _) in enumerate(decoder_layers(model))}
