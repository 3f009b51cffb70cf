"""The pruned model is stock Megatron: a pruned `TransformerConfig`, and a GPTModel / MambaModel rebuilt from it.

Owns: writing the target sizes into a copy of the config (an export config is a patch to
`TransformerConfig`), expressing which layers each pipeline stage keeps after depth pruning (the pipeline
layout, per-layer config fields, a hybrid model's layer pattern), and rebuilding the model with the same
constructor arguments as the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from megatron_prune.minitron.config import ModelShape, hybrid_layer_symbols, moe_layer_pattern

_LAYOUT_FIELDS = (
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
)  # fmt: skip


def stage_layout(counts: List[int], hybrid: bool = False) -> Dict[str, object]:
    """Config fields that make Megatron build `counts[i]` decoder layers on pipeline stage i.

    Even splits use Megatron's default; anything else an explicit `pipeline_model_parallel_layout`
    ("E" embedding, "t" a transformer layer, "L" loss, "|" between stages), e.g. [3, 2] -> "Ettt|ttL",
    [0, 4] -> "E|ttttL". A hybrid model's `MambaStack` reads only the first and last stage's counts
    (`num_layers_in_first/last_pipeline_stage`, the middle stages even): [3, 2] -> first 3, last 2.
    Every other layout field is reset so that Megatron sees one description.
    """
    fields: Dict[str, object] = {f: False if f.startswith("account_for") else None for f in _LAYOUT_FIELDS}
    if len(set(counts)) > 1 and hybrid:
        if len(set(counts[1:-1])) > 1:
            raise ValueError(f"layers per pipeline stage {counts}: a hybrid model's middle stages must hold equal numbers")
        fields.update(num_layers_in_first_pipeline_stage=counts[0], num_layers_in_last_pipeline_stage=counts[-1])
    elif len(set(counts)) > 1:
        last = len(counts) - 1
        fields["pipeline_model_parallel_layout"] = "|".join(
            ("E" if i == 0 else "") + "t" * c + ("L" if i == last else "") for i, c in enumerate(counts)
        )
    return fields


def per_layer_fields(config) -> Dict[str, list]:
    """Config fields that say something per layer, as explicit 0/1 lists over layers 1..L, so depth
    pruning can keep the entries of the surviving layers (Megatron reads them by layer number)."""
    layers = range(1, config.num_layers + 1)
    fields = {}
    window = config.window_attn_skip_freq  # 1 = sliding-window layer
    if isinstance(window, int):
        fields["window_attn_skip_freq"] = [int(n % window != 0) for n in layers]
    elif isinstance(window, list):
        fields["window_attn_skip_freq"] = list(window)
    no_rope = config.no_rope_freq  # 1 = layer without rope; __post_init__ already expanded an int
    if no_rope:
        fields["no_rope_freq"] = [int(n % no_rope == 0) for n in layers] if isinstance(no_rope, int) else list(no_rope)
    moe = getattr(config, "moe_layer_freq", 1)  # 1 = MoE layer; an int k: layers 1, 1+k, 1+2k, ...
    if config.num_moe_experts and moe != 1:
        fields["moe_layer_freq"] = [int(is_moe) for is_moe in moe_layer_pattern(config)]
    return fields


def pruned_config(config, shape: ModelShape, target: Mapping[str, int], stage_counts: List[int],
                  original_counts: List[int], kept_layers: List[int], hybrid_pattern: Optional[str] = None):  # fmt: skip
    """A new TransformerConfig with the target sizes; `kv_channels` is pinned to the original head dim (and
    `mamba_num_heads`, which Megatron otherwise derives from the hidden size, is always written; an MLA model's
    `num_query_groups` follows its heads, as megatron-core sets it when none is given).

    The pipeline layout fields are kept as they are unless depth pruning changed what a stage holds;
    per-layer fields keep the entries of `kept_layers` (global 1-indexed numbers, ascending), and so does a
    hybrid layer pattern the config carries (Megatron-Bridge's Mamba providers do).
    """
    fields = {f.name for f in dataclasses.fields(config)}
    changes = dict(target)
    changes["kv_channels"] = shape.kv_channels
    if shape.mla is not None:  # MLA has one K/V per head: megatron-core's default (and its inference cache's) groups
        changes["num_query_groups"] = target["num_attention_heads"]
    if list(stage_counts) != list(original_counts):
        changes.update(stage_layout(stage_counts, hybrid=hybrid_pattern is not None))
    if len(kept_layers) != config.num_layers:
        changes.update({f: [v[n - 1] for n in kept_layers] for f, v in per_layer_fields(config).items()})
    if getattr(config, "hybrid_override_pattern", None) and "hybrid_override_pattern" in fields:
        changes["hybrid_override_pattern"] = slice_hybrid_pattern(config.hybrid_override_pattern, kept_layers)
    with warnings.catch_warnings():  # __post_init__ re-runs and repeats deprecation notes the user has seen
        warnings.simplefilter("ignore")
        new = dataclasses.replace(config, **changes)
        # attributes set on the instance, not dataclass fields (e.g. `yarn_rotary_scaling_factor`, which GPTModel reads
        # for YaRN rope and model builders set after construction): `replace` drops them; copy each one `new` lacks
        # (those __post_init__ derives are recomputed, not copied)
        for name, value in vars(config).items():
            if name not in fields and not hasattr(new, name):
                setattr(new, name, value)
        if callable(getattr(new, "finalize", None)):  # Megatron-Bridge providers defer __post_init__ to finalize()
            new.finalize()
        return new


def slice_hybrid_pattern(pattern: str, kept_layers: Sequence[int]) -> str:
    """The layer pattern of a hybrid model that keeps `kept_layers` (1-indexed) of the decoder layers of
    `pattern`: their symbols, in order; pipeline-stage separators ``|`` stay where they were (survivors
    stay on their stage) and a multi-token-prediction suffix (``/`` on) is kept as it is.
    ``slice_hybrid_pattern("M*|M-/MM", [1, 3, 4]) == "M|M-/MM"``."""
    body, slash, mtp = pattern.partition("/")
    hybrid_layer_symbols(pattern)  # checks the symbols
    kept, out, number = set(kept_layers), [], 0
    for symbol in body:
        if symbol == "|":
            out.append(symbol)
            continue
        number += 1
        if number in kept:
            out.append(symbol)
    return "".join(out) + slash + mtp


def hybrid_pattern_of(model: torch.nn.Module) -> Optional[str]:
    """A hybrid (Mamba) model's layer pattern, one symbol per decoder layer of the whole model (allocated
    from the attention/MLP ratios as Megatron does when no pattern was given); None for a GPTModel."""
    if not hasattr(model, "mamba_stack_spec"):
        return None
    if model.hybrid_override_pattern:
        return model.hybrid_override_pattern
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

    return "".join(allocate_layers(model.config.num_layers, model.hybrid_attention_ratio, model.hybrid_mlp_ratio))


def rebuild(model: torch.nn.Module, config, kept_local: List[int], kept_layers: List[int], on_meta: bool = False) -> torch.nn.Module:
    """This stage of `model` (a GPTModel or a MambaModel) built like it (same spec, vocab, embeddings, rope) from
    the pruned `config`, keeping the layers at `kept_local` of this stage (`kept_layers`: the global numbers of
    every surviving layer).

    A GPTModel's block spec (per-layer specs plus the final norm, e.g. dense and MoE layers mixed) is rebuilt with
    the specs of the kept layers and the same final norm; a MambaModel gets the layer pattern of the kept layers.
    The rotary frequencies are copied from `model`, as they depend on constructor arguments (e.g. the rope scaling
    factor) that the model does not keep. Weights are allocated without initialisation: the caller loads the
    sliced state dict (`on_meta`: on the meta device, nothing allocated, a dry run of the build; weights Megatron
    places with an explicit device, i.e. without CPU initialisation, are still allocated; the output layer is
    untied at PP > 1, where the tie is an all-reduce of real embedding weights between the first and last stage).
    """
    names = ("vocab_size", "max_sequence_length", "pre_process", "post_process", "fp16_lm_cross_entropy",
             "parallel_output", "share_embeddings_and_output_weights", "position_embedding_type")  # fmt: skip
    kwargs = {name: getattr(model, name) for name in names}  # the constructor arguments GPTModel and MambaModel share
    kwargs["pg_collection"] = model.pg_collection
    rope = getattr(model, "rotary_pos_emb", None)
    pattern = hybrid_pattern_of(model)
    if pattern is None:
        kwargs.update(transformer_layer_spec=_block_spec(model.transformer_layer_spec, kept_local),
                      rotary_percent=model.rotary_percent, rotary_base=model.rotary_base, rope_scaling=model.rotary_scaling,
                      mtp_block_spec=model.mtp_block_spec, vp_stage=model.vp_stage)  # fmt: skip
    else:
        kwargs.update(mamba_stack_spec=model.mamba_stack_spec, hybrid_override_pattern=slice_hybrid_pattern(pattern, kept_layers))
        if rope is not None:  # the rotated share of each head; the frequencies themselves are copied below
            kwargs["rotary_percent"] = 2 * rope.inv_freq.numel() / config.kv_channels
    if rope is not None:
        kwargs["seq_len_interpolation_factor"] = rope.seq_len_interpolation_factor
    if on_meta and config.pipeline_model_parallel_size > 1:
        kwargs["share_embeddings_and_output_weights"] = False
    init = config.perform_initialization
    config.perform_initialization = False
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            new = type(model)(config=config, **kwargs)
    finally:
        config.perform_initialization = init
    if on_meta:
        return new
    if rope is not None and hasattr(rope, "inv_freq"):
        new.rotary_pos_emb.inv_freq = rope.inv_freq.clone()
    return new.to(next(model.parameters()).device)


def _block_spec(spec, kept_local: List[int]):
    """A layer spec stays as is; a block spec keeps the layer specs at `kept_local` (this stage's layers)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    block = _block_submodules(spec)
    if block is None:
        return spec
    return TransformerBlockSubmodules(layer_specs=[block.layer_specs[i] for i in kept_local], layer_norm=block.layer_norm)


def block_spec_layers(spec):
    """The number of layer specs of a block spec (None for a layer spec, which serves any number of layers)."""
    block = _block_submodules(spec)
    return None if block is None else len(block.layer_specs)


def _block_submodules(spec):
    """The TransformerBlockSubmodules a GPTModel's `transformer_layer_spec` describes, or None for a layer spec."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type) and issubclass(spec.module, TransformerBlock):
        spec = spec.submodules
    return spec if isinstance(spec, TransformerBlockSubmodules) else None
