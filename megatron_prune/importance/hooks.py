"""Hooks: route activations of MCore modules into the statistics, and nothing more.

Owns: *where* each statistic is observed (`LAYER_SITES`) and the hook lifecycle. The math lives in
statistics.py. Keys are ``layer{global_layer_number}/{site}``, so what a rank collects is independent of
how layers are spread over pipeline stages. A site is hooked in every layer that holds its module (an MoE
layer has a router and experts instead of `mlp.linear_fc1`/`linear_fc2`).

Sites, per decoder layer (MCore tensors are [S, B, C]; routed-expert tokens are [T, C]):
  qkv_in         normalised input of `self_attention.linear_qkv`    -> hidden_size                     [H]
  fc1_in         normalised input of `mlp.linear_fc1`               -> hidden_size                     [H]
  router_in      input of the MoE `mlp.router` (pre_mlp_layernorm)  -> hidden_size                     [H]
  mamba_in       normalised input of a Mamba `mixer.in_proj`        -> hidden_size                     [H]
  proj_in        input of `self_attention.linear_proj`              -> num_attention_heads             [N*d]
  fc2_in         input of `mlp.linear_fc2`                          -> ffn_hidden_size                 [F]
  shared_fc2_in  input of `mlp.shared_experts.linear_fc2`           -> moe_shared_expert_intermediate_size [Fs]
  expert_fc2_in  input of each routed expert's `linear_fc2` (row e) -> moe_ffn_hidden_size             [E, Fm]
  experts        outputs of `mlp.experts`, split per expert         -> num_moe_experts                 [2, E]
  mamba_x        the x segment of `mixer.in_proj`'s output           -> mamba_num_heads, mamba_head_dim  [nh*hd]
  block          (layer input, layer output)                        -> num_layers                      []
"Normalised input" is what the pre-sublayer norm produced. With the local spec the norm is a separate
module, so the linear's input already is its output. With Transformer Engine specs the norm is fused into
the linear (`layer_norm_weight`), so it is recomputed here from the linear's input and the norm's
parameters: one mapping serves both specs. An expert's fc2 input already carries its router probability
(MCore scales the activation before fc2), and each call counts as one sample of its [T, Fm] tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_prune.importance import statistics as S
from megatron_prune.slicing.table import LAYER_ROLES, ROUTED_EXPERTS


@dataclass(frozen=True)
class HookSite:
    name: str  # statistic name, the suffix of the store key
    module: str  # path inside a decoder layer; "" is the layer itself; "*" stands for each routed expert
    kind: str  # "input" | "normed_input" | "block" | "expert_outputs" | "mamba_x"
    axis: str  # the axis it informs

    @property
    def tp_partitioned(self) -> bool:
        """Input of a row-parallel linear (the table splits its weight's input dim) or output of a column-
        parallel one: each TP rank sees its own slice of the channels (the last dim of the accumulator)."""
        if self.kind == "mamba_x":
            return LAYER_ROLES[self.module]["weight"].tp_dim == 0
        return self.kind in ("input", "normed_input") and LAYER_ROLES[self.module]["weight"].tp_dim == 1


LAYER_SITES: Tuple[HookSite, ...] = (
    HookSite("qkv_in", "self_attention.linear_qkv", "normed_input", "hidden_size"),
    HookSite("fc1_in", "mlp.linear_fc1", "normed_input", "hidden_size"),
    HookSite("router_in", "mlp.router", "normed_input", "hidden_size"),
    HookSite("mamba_in", "mixer.in_proj", "normed_input", "hidden_size"),
    HookSite("proj_in", "self_attention.linear_proj", "input", "num_attention_heads"),
    HookSite("fc2_in", "mlp.linear_fc2", "input", "ffn_hidden_size"),
    HookSite("shared_fc2_in", "mlp.shared_experts.linear_fc2", "input", "moe_shared_expert_intermediate_size"),
    HookSite("expert_fc2_in", f"{ROUTED_EXPERTS}.*.linear_fc2", "input", "moe_ffn_hidden_size"),
    HookSite("experts", "mlp.experts", "expert_outputs", "num_moe_experts"),
    HookSite("mamba_x", "mixer.in_proj", "mamba_x", "mamba_num_heads"),
    HookSite("block", "", "block", "num_layers"),
)
SITES: Dict[str, HookSite] = {site.name: site for site in LAYER_SITES}
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


def site_modules(layer: torch.nn.Module, path: str) -> List[Tuple[Optional[int], torch.nn.Module]]:
    """The modules of `layer` at `path` as (routed expert number or None, module); [] if the layer has none."""
    if "*" not in path:
        try:
            return [(None, layer.get_submodule(path))]
        except AttributeError:
            return []
    container, _, rest = path.partition(".*.")
    try:
        experts = layer.get_submodule(container)
    except AttributeError:
        return []
    return [(e, expert.get_submodule(rest)) for e, expert in enumerate(experts)]


def register_hooks(model: torch.nn.Module, store: S.StatStore) -> List[torch.utils.hooks.RemovableHandle]:
    """Attach one hook per (layer, site module); accumulators start at zero so every replica holds every key."""
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
            modules = site_modules(layer, site.module)
            if not modules:
                continue
            if site.kind == "expert_outputs":
                (_, experts), = modules
                store.add(key, torch.zeros(2, experts.num_local_experts, device=device))
                handles.append(experts.register_forward_hook(_expert_outputs_hook(store, key)))
                continue
            if site.kind == "mamba_x":
                (_, in_proj), = modules
                D = layer.mixer.d_inner_local_tp
                store.add(key, torch.zeros(D, device=device))
                handles.append(in_proj.register_forward_hook(_mamba_x_hook(store, key, D)))
                continue
            width = modules[0][1].weight.shape[1]
            per_expert = modules[0][0] is not None
            store.add(key, torch.zeros((len(modules), width) if per_expert else (width,), device=device))
            for expert, module in modules:
                fn = _input_hook(store, key, normalise=site.kind == "normed_input", row=expert)
                handles.append(module.register_forward_pre_hook(fn))
        first = False
    return handles


def _input_hook(store: S.StatStore, key: str, normalise: bool, row: Optional[int] = None) -> Callable:
    def hook(module, args):
        x = args[0]
        if x.numel() == 0:  # a routed expert that got no tokens in this call: no sample
            return
        value = S.channel_sum_sq(_normalise(module, x) if normalise else x)
        if row is None:
            store.add(key, value)
        else:
            store.add_row(key, row, value)

    return hook


def _expert_outputs_hook(store: S.StatStore, key: str) -> Callable:
    def hook(module, args, output):
        # SequentialMLP(tokens [T, H] sorted by expert, tokens_per_expert [E], probs) -> (outputs [T, H], bias)
        store.add(key, S.expert_output_norms(output[0], args[1]))

    return hook


def _mamba_x_hook(store: S.StatStore, key: str, d_inner: int) -> Callable:
    def hook(module, args, output):
        # in_proj output [S, B, 2D + 2*ng*ds + nh] = [z, x, B, C, dt]: the heads' channels are x = [D, 2D)
        out = output[0] if isinstance(output, (tuple, list)) else output
        store.add(key, S.channel_sum_sq(out[..., d_inner : 2 * d_inner]))

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
