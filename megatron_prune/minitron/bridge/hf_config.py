"""The pruned sizes written into a copy of the model's Hugging Face config (names: the axis registry's `hf_names`).

    hidden_size <- hidden_size          intermediate_size   <- ffn_hidden_size
    num_attention_heads <- num_attention_heads   num_key_value_heads <- num_query_groups
    head_dim <- kv_channels (always written: a pruned hidden size need not be heads x head_dim)
    num_hidden_layers <- num_layers     per-layer lists (e.g. Qwen3's `layer_types`) keep the surviving entries
MoE families, where the config has the field (the router's top-k, `num_experts_per_tok`, is unchanged):
    num_experts / num_local_experts / n_routed_experts <- num_moe_experts
    moe_intermediate_size <- moe_ffn_hidden_size      shared_expert_intermediate_size <- moe_shared_expert_intermediate_size
    mlp_only_layers (dense layers of Qwen2/3-MoE) renumbered to the surviving layers
DeepSeek-V2/V3 (multi-latent attention; its MLA dims are never pruned): `head_dim` (there the rope dim) is left as
it is, `first_k_dense_replace` counts the surviving dense layers (they must still come first), and
`n_shared_experts` = shared-expert width / routed-expert width (the HF model sizes its shared experts by that product).
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.axes import default_kv_channels, hf_sizes

_SIZES = {**hf_sizes(optional=False), "head_dim": "kv_channels"}  # HF field -> TransformerConfig field
_MOE_SIZES = hf_sizes(optional=True)  # written only where the HF config has the field


def pruned_hf_config(hf_config, config, kept_layers: Sequence[int], dtype=None):
    """A copy of `hf_config` with the sizes of the pruned `config` (a TransformerConfig).

    `kept_layers`: the original 1-indexed numbers of the surviving layers, ascending. `dtype`: the dtype of the
    weights written with it, recorded as the config's dtype (so that the folder loads as it was saved). The
    original is not modified. Warns under transformers 5, which refuses a hidden size that is not heads x head_dim.
    """
    original_layers = hf_config.num_hidden_layers
    pruned = copy.deepcopy(hf_config)
    if dtype is not None:  # transformers >= 4.56 names it `dtype`, older versions `torch_dtype`
        setattr(pruned, "dtype" if hasattr(pruned, "dtype") else "torch_dtype", dtype)
    mla = getattr(config, "multi_latent_attention", False)
    for hf_field, mcore_field in _SIZES.items():
        if not (mla and hf_field == "head_dim"):
            setattr(pruned, hf_field, int(getattr(config, mcore_field) or _default(config, mcore_field)))
    if getattr(config, "num_moe_experts", None):
        for hf_field, mcore_field in _MOE_SIZES.items():
            if getattr(hf_config, hf_field, None) is not None and getattr(config, mcore_field, None) is not None:
                setattr(pruned, hf_field, int(getattr(config, mcore_field)))
    for name, value in vars(hf_config).items():
        if isinstance(value, list) and len(value) == original_layers and original_layers != len(kept_layers):
            setattr(pruned, name, [value[n - 1] for n in kept_layers])
    if getattr(hf_config, "mlp_only_layers", None) and original_layers != len(kept_layers):  # 0-indexed dense layers
        dense = set(hf_config.mlp_only_layers)
        pruned.mlp_only_layers = [i for i, n in enumerate(kept_layers) if n - 1 in dense]
    if getattr(hf_config, "first_k_dense_replace", None) is not None:
        _deepseek_layers(pruned, hf_config, config, kept_layers)
    if isinstance(getattr(hf_config, "max_window_layers", None), int):  # Qwen2/3: layers below it use full attention
        pruned.max_window_layers = sum(1 for n in kept_layers if n <= hf_config.max_window_layers)
    _warn_transformers_5(pruned)
    return pruned


def _deepseek_layers(pruned, hf_config, config, kept_layers: Sequence[int]) -> None:
    """DeepSeek's dense-then-MoE layer split and shared-expert count, for the pruned `config`."""
    dense = [n <= hf_config.first_k_dense_replace for n in kept_layers]
    if dense != sorted(dense, reverse=True):
        raise PruneConfigError(f"the surviving layers {list(kept_layers)} put a dense layer after an MoE layer, which a "
                               "DeepSeek Hugging Face config (first_k_dense_replace) cannot express: protect or drop layers "
                               "so that the dense ones still come first (depth.protected_layers / layers_to_drop)")  # fmt: skip
    pruned.first_k_dense_replace = sum(dense)
    routed, shared = getattr(config, "moe_ffn_hidden_size", None), getattr(config, "moe_shared_expert_intermediate_size", None)
    if routed and shared and getattr(hf_config, "n_shared_experts", None):
        if shared % routed:
            raise PruneConfigError(f"moe_shared_expert_intermediate_size={shared} is not a multiple of moe_ffn_hidden_size="
                                   f"{routed}: a DeepSeek Hugging Face config sizes its shared experts as n_shared_experts x "
                                   "moe_intermediate_size; choose sizes whose ratio is an integer")  # fmt: skip
        pruned.n_shared_experts = shared // routed


def _default(config, field: str) -> int:
    if field == "num_query_groups":
        return config.num_attention_heads
    if field == "kv_channels":
        return default_kv_channels(config)
    raise ValueError(f"pruned config has no {field}")


def _warn_transformers_5(pruned) -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major >= 5 and pruned.hidden_size != pruned.num_attention_heads * pruned.head_dim:
        warnings.warn(
            f"transformers {transformers.__version__}: hidden_size={pruned.hidden_size} is not num_attention_heads x "
            f"head_dim = {pruned.num_attention_heads} x {pruned.head_dim}; transformers 5 refuses such a config at save "
            "and load time. Load the exported model with transformers<5 (which Megatron-Bridge 0.3.1 requires).",
            stacklevel=2,
        )

